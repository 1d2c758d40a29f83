"""Datasets as resident tensors: synthetic data, IDX / CIFAR-10 / image-folder readers, splits, subsets.

Every file-backed dataset here is written by the test itself into a tmp folder (tiny, synthetic), except
Fashion-MNIST, which `make setup` installs from the Debian package into /usr/share/datasets/fashion-mnist.
Nothing may download: every config passes download=False and the torchvision download hook is disabled.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import SearchsvcError
from workers.data import sources
from workers.data.datasets import DatasetConfig, Splits, SyntheticConfig, load_dataset, normalize


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to download fails the test instead of touching the network."""

    def refuse(name, root):  # noqa: ANN001
        raise AssertionError(f"test tried to download {name} into {root}")

    monkeypatch.setattr(sources, "_torchvision_download", refuse)


def synthetic(**overrides) -> DatasetConfig:
    syn = {k: overrides.pop(k) for k in list(overrides) if k in SyntheticConfig.__dataclass_fields__}
    return DatasetConfig(name="synthetic", download=False, synthetic=SyntheticConfig(**syn), **overrides)


# ---- IDX files, written by hand ---------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """IDX format: magic 0x0000 08 <ndim> (unsigned byte data), one big-endian uint32 per dim, then data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def indexed_images(count: int, size: int = 6, start: int = 0) -> np.ndarray:
    """Images whose every pixel is their own index (start + i), so each one is unique and identifiable."""
    assert start + count <= 256
    return np.repeat(np.arange(start, start + count, dtype=np.uint8), size * size).reshape(count, size, size)


def write_fashion_folder(folder: Path, n_train: int = 200, n_test: int = 40, gz: bool = False) -> dict:
    """A fake Fashion-MNIST: train images 0..n_train-1, test images n_train.., label = index % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    train_x = indexed_images(n_train)
    test_x = indexed_images(n_test, start=n_train)
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    test_y = (np.arange(n_train, n_train + n_test) % 10).astype(np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", train_x)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", train_y)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", test_x)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", test_y)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def image_ids(images: torch.Tensor) -> list[int]:
    """The index encoded in each indexed image (all its pixels hold it)."""
    assert bool((images == images[:, :, :1, :1]).all()), "an indexed image is not constant"
    return images[:, 0, 0, 0].tolist()


# ---- synthetic ---------------------------------------------------------------------------------------

def test_synthetic_images_are_uint8_nchw_and_labels_int64():
    splits = load_dataset(synthetic(channels=3, image_size=12, train_size=50, test_size=20, num_classes=5))
    for images, labels in (splits.train, splits.val, splits.test):
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (3, 12, 12)
        assert labels.dtype == torch.int64
        assert labels.shape == (images.shape[0],)
        assert int(labels.min()) >= 0 and int(labels.max()) < 5
    assert splits.num_classes == 5
    assert splits.inputs.shape == (3, 12, 12)


def test_synthetic_split_sizes_follow_val_fraction():
    splits = load_dataset(synthetic(train_size=1000, test_size=300, val_fraction=0.25))
    assert splits.sizes() == {"train": 750, "val": 250, "test": 300}


def test_zero_val_fraction_keeps_every_training_image():
    splits = load_dataset(synthetic(train_size=100, test_size=10, val_fraction=0.0))
    assert splits.sizes() == {"train": 100, "val": 0, "test": 10}


def test_same_split_seed_gives_identical_tensors():
    a = load_dataset(synthetic(train_size=200, test_size=50, split_seed=3))
    b = load_dataset(synthetic(train_size=200, test_size=50, split_seed=3))
    for (xa, ya), (xb, yb) in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
    assert (a.mean, a.std) == (b.mean, b.std)


def test_different_split_seed_gives_different_tensors():
    a = load_dataset(synthetic(train_size=200, test_size=50, split_seed=3))
    b = load_dataset(synthetic(train_size=200, test_size=50, split_seed=4))
    assert not torch.equal(a.train[0], b.train[0])
    assert not torch.equal(a.val[0], b.val[0])


def test_val_fraction_leaving_no_training_image_is_an_error():
    with pytest.raises(SearchsvcError, match="dataset.val_fraction"):
        load_dataset(synthetic(train_size=2, test_size=2, val_fraction=0.9))


def test_unknown_dataset_name_is_an_error():
    with pytest.raises(SearchsvcError, match="dataset.name"):
        load_dataset(DatasetConfig(name="imagenet", download=False))  # type: ignore[arg-type]


# ---- splits of a dataset whose images are all distinct ---------------------------------------------

def test_train_and_val_are_disjoint_and_cover_the_official_train_set(tmp_path):
    write_fashion_folder(tmp_path, n_train=200, n_test=40)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.25))
    train_ids, val_ids = image_ids(splits.train[0]), image_ids(splits.val[0])
    assert len(train_ids) == 150 and len(val_ids) == 50
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(train_ids + val_ids) == list(range(200))


def test_test_split_is_the_official_test_set(tmp_path):
    write_fashion_folder(tmp_path, n_train=200, n_test=40)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    assert sorted(image_ids(splits.test[0])) == list(range(200, 240))


def test_split_keeps_each_image_with_its_label(tmp_path):
    write_fashion_folder(tmp_path, n_train=200, n_test=40)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, split_seed=5))
    for images, labels in (splits.train, splits.val, splits.test):
        assert [i % 10 for i in image_ids(images)] == labels.tolist()


def test_split_is_shuffled_not_a_prefix(tmp_path):
    write_fashion_folder(tmp_path, n_train=200, n_test=40)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.25))
    assert sorted(image_ids(splits.val[0])) != list(range(50))


# ---- IDX reader --------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzipped"])
def test_read_idx_returns_the_image_array_written(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    path = write_idx(tmp_path / f"images-idx3-ubyte{suffix}", array)
    got = sources.read_idx(path)
    assert got.shape == (7, 5, 4)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzipped"])
def test_read_idx_returns_the_label_vector_written(tmp_path, suffix):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    path = write_idx(tmp_path / f"labels-idx1-ubyte{suffix}", labels)
    got = sources.read_idx(path)
    assert got.shape == (8,)
    np.testing.assert_array_equal(got, labels)


def test_idx_header_is_big_endian_magic_2051_for_images(tmp_path):
    # Guard on the helper itself: 0x00000803 == 2051 is the documented magic of a 3-dim ubyte IDX file.
    data = idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 3, 4)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_fashion_mnist_loads_idx_files_from_root(tmp_path, gz):
    written = write_fashion_folder(tmp_path, n_train=30, n_test=12, gz=gz)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.0))
    assert splits.sizes() == {"train": 30, "val": 0, "test": 12}
    assert splits.train[0].shape == (30, 1, 6, 6) and splits.train[0].dtype == torch.uint8
    assert splits.train[1].dtype == torch.int64
    assert splits.num_classes == 10
    # Same images as written (the split shuffles them, so compare in the order of the encoded index).
    order = torch.argsort(splits.train[0][:, 0, 0, 0])
    np.testing.assert_array_equal(splits.train[0][order, 0].numpy(), written["train_x"])
    np.testing.assert_array_equal(splits.train[1][order].numpy(), written["train_y"].astype(np.int64))


def test_fashion_mnist_finds_files_in_torchvision_raw_layout(tmp_path):
    write_fashion_folder(tmp_path / "FashionMNIST" / "raw", n_train=20, n_test=10)
    splits = load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.0))
    assert splits.sizes() == {"train": 20, "val": 0, "test": 10}


def _truncated(path: Path) -> None:
    path.write_bytes(idx_bytes(np.zeros((10, 4, 4), dtype=np.uint8))[:60])


def _garbage(path: Path) -> None:
    path.write_bytes(b"this is not an IDX file at all, just text")


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _wrong_dtype(path: Path) -> None:
    path.write_bytes(struct.pack(">I", 0x00000D03) + struct.pack(">3I", 1, 2, 2) + b"\x00" * 16)


def _gz_truncated(path: Path) -> None:
    path.write_bytes(gzip.compress(idx_bytes(np.arange(160, dtype=np.uint8).reshape(10, 4, 4)))[:30])


def _gz_garbage(path: Path) -> None:
    path.write_bytes(b"\x1f\x8b not really gzip")


CORRUPT = [("truncated", "", _truncated), ("garbage", "", _garbage), ("empty", "", _empty),
           ("wrong_dtype", "", _wrong_dtype), ("gz_truncated", ".gz", _gz_truncated),
           ("gz_garbage", ".gz", _gz_garbage)]


@pytest.mark.parametrize("suffix, corrupt", [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_unreadable_idx_file_is_an_error_naming_the_file(tmp_path, suffix, corrupt):
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    corrupt(path)
    with pytest.raises(SearchsvcError) as info:
        sources.read_idx(path)
    assert str(path) in str(info.value)


def test_corrupt_fashion_file_fails_load_dataset_naming_the_file(tmp_path):
    write_fashion_folder(tmp_path, n_train=20, n_test=10)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(idx_bytes(np.zeros(10, dtype=np.uint8))[:12])
    with pytest.raises(SearchsvcError) as info:
        load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    assert str(bad) in str(info.value)


def test_image_and_label_count_mismatch_is_an_error(tmp_path):
    write_fashion_folder(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, dtype=np.uint8))
    with pytest.raises(SearchsvcError, match="counts differ"):
        load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False))


def test_fashion_root_without_files_is_an_error_naming_dataset_root(tmp_path):
    with pytest.raises(SearchsvcError) as info:
        load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    assert "dataset.root" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_fashion_root_with_some_files_missing_is_an_error(tmp_path):
    write_fashion_folder(tmp_path, n_train=20, n_test=10)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(SearchsvcError, match="dataset.root"):
        load_dataset(DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False))


# ---- Fashion-MNIST from the Debian package ------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion() -> Splits:
    """The real Fashion-MNIST, from /usr/share/datasets/fashion-mnist (installed by `make setup`)."""
    return load_dataset(DatasetConfig(name="fashion_mnist", download=False, val_fraction=0.1))


def test_debian_fashion_mnist_is_found_without_a_root(fashion):
    assert sources.DEBIAN_FASHION == Path("/usr/share/datasets/fashion-mnist")
    assert fashion.name == "fashion_mnist"


def test_debian_fashion_mnist_split_sizes(fashion):
    assert fashion.sizes() == {"train": 54000, "val": 6000, "test": 10000}


def test_debian_fashion_mnist_is_10_classes_of_28x28_grey(fashion):
    assert fashion.num_classes == 10
    assert fashion.inputs.shape == (1, 28, 28)
    assert fashion.train[0].shape == (54000, 1, 28, 28) and fashion.train[0].dtype == torch.uint8
    assert sorted(torch.unique(fashion.test[1]).tolist()) == list(range(10))


# ---- subset --------------------------------------------------------------------------------------------

def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("subset", [1, 29, 61, 100, 461])
def test_int_subset_keeps_exactly_that_many_training_images(subset):
    # 1024 official train images, val_fraction 0.1 → round(102.4) = 102 val, 922 train.
    splits = load_dataset(synthetic(train_size=1024, test_size=256, subset=subset))
    assert splits.sizes()["train"] == subset


def test_int_subset_scales_val_and_test_by_the_same_fraction():
    # 800 train / 200 val / 400 test; subset 200 = a quarter of the training split.
    splits = load_dataset(synthetic(train_size=1000, test_size=400, val_fraction=0.2, subset=200))
    assert splits.sizes() == {"train": 200, "val": 50, "test": 100}


def test_int_subset_rounds_val_and_test_up():
    # 922 train / 102 val / 256 test; subset 100: val 102*100/922 = 11.06 → 12, test 256*100/922 = 27.8 → 28.
    splits = load_dataset(synthetic(train_size=1024, test_size=256, subset=100))
    assert splits.sizes() == {"train": 100, "val": ceil_div(102 * 100, 922), "test": ceil_div(256 * 100, 922)}
    assert splits.sizes()["val"] == 12 and splits.sizes()["test"] == 28


def test_int_subset_at_least_the_train_size_keeps_everything():
    splits = load_dataset(synthetic(train_size=1000, test_size=400, val_fraction=0.2, subset=5000))
    assert splits.sizes() == {"train": 800, "val": 200, "test": 400}


@pytest.mark.parametrize("subset", [5400, 61])
def test_int_subset_of_fashion_mnist_keeps_exactly_that_many(subset):
    # 54000 train / 6000 val / 10000 test; val and test shrink by subset/54000, rounded up.
    splits = load_dataset(DatasetConfig(name="fashion_mnist", download=False, subset=subset))
    expected = {"train": subset, "val": ceil_div(6000 * subset, 54000), "test": ceil_div(10000 * subset, 54000)}
    assert splits.sizes() == expected


def test_float_subset_keeps_that_fraction_of_each_split():
    splits = load_dataset(synthetic(train_size=1000, test_size=400, val_fraction=0.2, subset=0.25))
    assert splits.sizes() == {"train": 200, "val": 50, "test": 100}


def test_float_subset_of_one_keeps_everything():
    splits = load_dataset(synthetic(train_size=1000, test_size=400, val_fraction=0.2, subset=1.0))
    assert splits.sizes() == {"train": 800, "val": 200, "test": 400}


def test_float_subset_above_one_is_an_error():
    with pytest.raises(ValueError, match="subset: a fraction"):  # validate names it as dataset.subset
        synthetic(train_size=100, test_size=10, subset=1.5)


def test_subset_is_a_subset_of_the_full_split(tmp_path):
    write_fashion_folder(tmp_path, n_train=200, n_test=40)
    config = DatasetConfig(name="fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.25)
    full = load_dataset(config)
    part = load_dataset(replace(config, subset=0.5))
    assert set(image_ids(part.train[0])) <= set(image_ids(full.train[0]))
    assert set(image_ids(part.val[0])) <= set(image_ids(full.val[0]))
    assert set(image_ids(part.train[0])).isdisjoint(image_ids(part.val[0]))


# ---- CIFAR-10 python batches -----------------------------------------------------------------------------

def write_cifar_folder(folder: Path, per_batch: int = 2, n_test: int = 3) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Fake `cifar-10-batches-py`: training rows get labels 0..9 (one each), so a label identifies its row."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    rows = {"train": [], "test": []}
    label = 0
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = list(range(label, label + per_batch))
        label += per_batch
        rows["train"] += list(zip(data, labels))
        with open(folder / f"data_batch_{i}", "wb") as handle:
            pickle.dump({"data": data, "labels": labels, "batch_label": f"training batch {i} of 5"}, handle)
    data = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    labels = [9 - i for i in range(n_test)]
    rows["test"] = list(zip(data, labels))
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": data, "labels": labels, "batch_label": "testing batch 1 of 1"}, handle)
    return rows


def test_cifar10_loads_fake_python_batches_as_3x32x32(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    splits = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.0))
    assert splits.sizes() == {"train": 10, "val": 0, "test": 3}
    assert splits.train[0].shape == (10, 3, 32, 32) and splits.train[0].dtype == torch.uint8
    assert splits.test[0].shape == (3, 3, 32, 32)
    assert splits.train[1].dtype == torch.int64
    assert splits.num_classes == 10


def test_cifar10_rows_are_red_green_blue_planes(tmp_path):
    rows = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    splits = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.0))
    by_label = {label: row for row, label in rows["train"]}
    images, labels = splits.train
    assert sorted(labels.tolist()) == list(range(10))
    for image, label in zip(images.numpy(), labels.tolist()):
        row = by_label[label]
        for channel in range(3):  # row = 1024 red, then 1024 green, then 1024 blue values, row-major
            plane = row[1024 * channel : 1024 * (channel + 1)]
            for y in (0, 7, 31):
                assert image[channel, y].tolist() == plane[32 * y : 32 * (y + 1)].tolist()


def test_cifar10_test_batch_keeps_pixels_and_labels(tmp_path):
    rows = write_cifar_folder(tmp_path / "cifar-10-batches-py", n_test=3)
    splits = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False))
    by_label = {label: row for row, label in rows["test"]}
    images, labels = splits.test
    assert sorted(labels.tolist()) == [7, 8, 9]
    for image, label in zip(images, labels.tolist()):
        assert image[2, 31, 31].item() == by_label[label][3071]
        assert image[1, 0, 5].item() == by_label[label][1024 + 5]


def test_cifar10_batches_directly_in_root_are_found(tmp_path):
    write_cifar_folder(tmp_path)
    splits = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.0))
    assert splits.sizes() == {"train": 10, "val": 0, "test": 3}


def test_cifar10_missing_folder_without_download_is_an_error(tmp_path):
    with pytest.raises(SearchsvcError, match="dataset.root"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path / "nowhere"), download=False))


def test_cifar10_corrupt_batch_is_an_error_naming_the_file(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(SearchsvcError) as info:
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False))
    assert str(bad) in str(info.value)


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path):
    """A tampered batch (a pickle that calls a function on load) is an error, and the function never runs."""
    write_cifar_folder(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump({"data": Payload(), "labels": [0]}, handle)
    with pytest.raises(SearchsvcError, match="refusing to load"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path), download=False))
    assert not marker.exists()


# ---- image folders --------------------------------------------------------------------------------------

# Created in this (unsorted) order; sorted, the classes are ant=0, bird=1, cat=2.
CLASS_COLOURS = {"cat": (0, 0, 255), "ant": (255, 0, 0), "bird": (0, 255, 0)}
SORTED_CLASSES = ["ant", "bird", "cat"]


def save_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_split_layout(root: Path, counts: dict[str, dict[str, int]]) -> None:
    for split, per_class in counts.items():
        for name, count in per_class.items():
            for i in range(count):
                save_png(root / split / name / f"{i}.png", CLASS_COLOURS[name])


def label_of_colour(image: torch.Tensor) -> int:
    colour = tuple(image[:, 0, 0].tolist())
    return SORTED_CLASSES.index(next(n for n, c in CLASS_COLOURS.items() if c == colour))


def test_imagefolder_train_test_layout_loads_all_images(tmp_path):
    write_split_layout(tmp_path, {"train": {"cat": 3, "ant": 2, "bird": 4}, "test": {"cat": 1, "ant": 2, "bird": 1}})
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.sizes() == {"train": 9, "val": 0, "test": 4}
    assert splits.train[0].shape == (9, 3, 8, 8) and splits.train[0].dtype == torch.uint8
    assert splits.test[0].shape == (4, 3, 8, 8)
    assert splits.num_classes == 3


def test_imagefolder_classes_are_sorted_folder_names(tmp_path):
    write_split_layout(tmp_path, {"train": {"cat": 3, "ant": 2, "bird": 4}, "test": {"cat": 1, "ant": 2, "bird": 1}})
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    for images, labels in (splits.train, splits.test):
        assert [label_of_colour(image) for image in images] == labels.tolist()
    assert sorted(splits.train[1].tolist()) == [0, 0, 1, 1, 1, 1, 2, 2, 2]  # ant x2, bird x4, cat x3


def test_imagefolder_resizes_every_image_to_image_size(tmp_path):
    save_png(tmp_path / "train" / "ant" / "big.png", (255, 0, 0), size=(20, 12))
    save_png(tmp_path / "train" / "bird" / "small.png", (0, 255, 0), size=(5, 7))
    save_png(tmp_path / "test" / "ant" / "t.png", (255, 0, 0), size=(8, 8))
    save_png(tmp_path / "test" / "bird" / "t.png", (0, 255, 0), size=(31, 9))
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.train[0].shape == (2, 3, 8, 8)
    assert splits.test[0].shape == (2, 3, 8, 8)
    for images, labels in (splits.train, splits.test):  # a flat colour stays that colour after resizing
        for image, label in zip(images, labels.tolist()):
            expected = torch.tensor([255, 0, 0] if label == 0 else [0, 255, 0], dtype=torch.uint8)
            assert torch.equal(image.amax(dim=(1, 2)), expected)
            assert torch.equal(image.amin(dim=(1, 2)), expected)


def test_imagefolder_converts_grey_images_to_three_channels(tmp_path):
    for split in ("train", "test"):
        for name, value in (("dark", 10), ("light", 200)):
            path = tmp_path / split / name / "g.png"
            path.parent.mkdir(parents=True)
            Image.new("L", (8, 8), value).save(path)
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.train[0].shape == (2, 3, 8, 8)
    for image, label in zip(*splits.train):
        assert bool((image == (10 if label == 0 else 200)).all())


def test_imagefolder_single_folder_layout_splits_off_a_fifth_as_test(tmp_path):
    # 15 images, each a unique colour: red = index * 10, green = 200 * class.
    for i in range(15):
        name = "a" if i < 6 else "b"
        save_png(tmp_path / name / f"{i:02d}.png", (i * 10, 200 if name == "b" else 0, 0))
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.sizes() == {"train": 12, "val": 0, "test": 3}
    assert splits.num_classes == 2
    ids = lambda images: [int(v) // 10 for v in images[:, 0, 0, 0].tolist()]  # noqa: E731
    train_ids, test_ids = ids(splits.train[0]), ids(splits.test[0])
    assert set(train_ids).isdisjoint(test_ids)
    assert sorted(train_ids + test_ids) == list(range(15))
    for images, labels in (splits.train, splits.test):
        assert [1 if i >= 6 else 0 for i in ids(images)] == labels.tolist()


def test_imagefolder_ignores_files_without_an_image_suffix(tmp_path):
    write_split_layout(tmp_path, {"train": {"ant": 2, "bird": 2}, "test": {"ant": 1, "bird": 1}})
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.sizes()["train"] == 4


def test_imagefolder_unreadable_image_is_an_error_naming_the_file(tmp_path):
    write_split_layout(tmp_path, {"train": {"ant": 2, "bird": 2}, "test": {"ant": 1, "bird": 1}})
    bad = tmp_path / "train" / "bird" / "broken.png"
    bad.write_bytes(b"this is text, not a PNG")
    with pytest.raises(SearchsvcError) as info:
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False))
    assert str(bad) in str(info.value)


def test_imagefolder_without_root_is_an_error():
    with pytest.raises(SearchsvcError, match="dataset.root"):
        load_dataset(DatasetConfig(name="imagefolder", root=None, download=False))


def test_imagefolder_root_without_class_folders_is_an_error(tmp_path):
    with pytest.raises(SearchsvcError, match="dataset.root"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), download=False))


# ---- normalisation and devices ----------------------------------------------------------------------------

def test_normalize_gives_zero_mean_unit_std_per_channel_on_train():
    splits = load_dataset(synthetic(channels=3, image_size=8, train_size=600, test_size=10))
    x = normalize(splits.train[0], splits.mean, splits.std)
    assert x.dtype == torch.float32 and x.shape == splits.train[0].shape
    per_channel = x.transpose(0, 1).reshape(3, -1).double()
    assert torch.allclose(per_channel.mean(dim=1), torch.zeros(3, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(per_channel.std(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_mean_and_std_are_per_channel_on_the_0_to_1_scale(tmp_path):
    # 5 flat red (255, 0, 0) and 5 flat green (0, 255, 0) images: red and green are half 0, half 1; blue all 0.
    write_split_layout(tmp_path, {"train": {"ant": 5, "bird": 5}, "test": {"ant": 1, "bird": 1}})
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8, download=False,
                                        val_fraction=0.0))
    assert splits.mean == pytest.approx((0.5, 0.5, 0.0))
    # Sample std of 320 zeros and 320 ones: sqrt(0.25 * 640 / 639) ≈ 0.5004; blue's 0 is clamped to 1e-3.
    n = 10 * 8 * 8
    expected = math.sqrt(0.25 * n / (n - 1))
    assert splits.std == pytest.approx((expected, expected, 1e-3), rel=1e-4)


def test_splits_to_cpu_returns_cpu_tensors_with_the_same_values():
    splits = load_dataset(synthetic(train_size=60, test_size=20))
    moved = splits.to("cpu")
    assert isinstance(moved, Splits) and moved is not splits
    for (xa, ya), (xb, yb) in zip((splits.train, splits.val, splits.test), (moved.train, moved.val, moved.test)):
        assert xb.device.type == "cpu" and yb.device.type == "cpu"
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert (moved.name, moved.num_classes, moved.mean, moved.std) == (splits.name, splits.num_classes,
                                                                      splits.mean, splits.std)
    assert moved.sizes() == splits.sizes()


def test_channel_statistics_are_summed_in_chunks_as_one_pass_over_the_split_would_give_them():
    """The mean and std of uint8 images, STATS_CHUNK images at a time (no float copy of the split), equal
    torch's over the whole split in float64."""
    from workers.data.datasets import STATS_CHUNK, _channel_stats

    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2 * STATS_CHUNK + 7, 3, 5, 4), dtype=torch.uint8, generator=gen)
    x = images.to(torch.float64).div(255).transpose(0, 1).reshape(3, -1)
    mean, std = _channel_stats(images)
    assert mean == pytest.approx(x.mean(1).tolist(), abs=2e-6) and std == pytest.approx(x.std(1).tolist(), abs=2e-6)
