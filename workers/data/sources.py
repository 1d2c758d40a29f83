"""Readers for the files behind each dataset: IDX (Fashion-MNIST), CIFAR-10 python batches, image folders.

Each returns (train_x, train_y, test_x, test_y, num_classes) with uint8 NCHW images. Files are
looked for in `root`, then in known places; torchvision downloads only when allowed and nothing
was found. Every failure names the paths searched and what to do.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import SearchsvcError
from workers.data.streaming import Split

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
DOWNLOAD_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "searchsvc" / "datasets"
FASHION_HINT = "install the Debian package dataset-fashion-mnist or set dataset.root to a folder with the IDX files"
CIFAR_HINT = "set dataset.root to a folder holding cifar-10-batches-py/ (the python version of CIFAR-10)"
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8}


Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


@dataclass
class Loaded:
    """What a reader found: the train and test split (resident (inputs, labels) tensors — uint8 NCHW images or
    float inputs, int64 labels — or streamed), the number of classes, a validation split where the source has its
    own (else None: carved from train), and where each split came from (split name → text for run.json)."""

    train: Split
    test: Split
    classes: int
    val: Split | None = None
    sources: dict[str, str] = field(default_factory=dict)
    fingerprint: str | None = None  # what the files are (folders.Files.fingerprint); None: the config names the data
    parts: tuple[str, ...] | None = None  # inputs of several named parts (a dict per example), packed [P, ...]

    @classmethod
    def of(cls, raw: Raw) -> Loaded:
        train_x, train_y, test_x, test_y, classes = raw
        return cls((train_x, train_y), (test_x, test_y), classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array: magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code not in _IDX_DTYPES:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as err:
        raise SearchsvcError(f"dataset file {path} is not a readable IDX file: {err}") from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_folders(root: str | None) -> list[Path]:
    if root is not None:
        base = Path(root).expanduser()
        return [base, base / "FashionMNIST" / "raw", base / "fashion-mnist"]
    return [DEBIAN_FASHION, DOWNLOAD_ROOT / "FashionMNIST" / "raw"]


def fashion_mnist(root: str | None, download: bool) -> Raw:
    """Fashion-MNIST: 60k train / 10k test, 28x28 grey, 10 classes."""
    folders = _fashion_folders(root)
    for folder in folders:
        files = {k: _find_idx(folder, stem) for k, stem in FASHION_FILES.items()}
        if all(files.values()):
            return _idx_splits(files)
    if download and root is None:
        _torchvision_download("FashionMNIST", DOWNLOAD_ROOT)
        return fashion_mnist(str(DOWNLOAD_ROOT), download=False)
    searched = ", ".join(str(f) for f in folders)
    raise SearchsvcError(f"dataset.root: Fashion-MNIST files not found in {searched}; {FASHION_HINT}")


def _idx_splits(files: dict[str, Path | None]) -> Raw:
    arrays = {k: read_idx(p) for k, p in files.items() if p is not None}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise SearchsvcError(f"dataset file {files[split + '_x']}: image and label counts differ")
    as_images = lambda a: torch.from_numpy(a.copy()).unsqueeze(1)  # noqa: E731 — N,H,W → N,1,H,W
    as_labels = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    return (as_images(arrays["train_x"]), as_labels(arrays["train_y"]), as_images(arrays["test_x"]),
            as_labels(arrays["test_y"]), int(arrays["train_y"].max()) + 1)


def _torchvision_download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    try:
        for train in (True, False):
            getattr(tvd, name)(str(root), train=train, download=True)
    except Exception as err:  # noqa: BLE001 — any network failure means the same thing to the user
        hint = FASHION_HINT if name == "FashionMNIST" else CIFAR_HINT
        raise SearchsvcError(f"dataset: no local {name} files and the download failed ({err}); {hint}") from None


def cifar10(root: str | None, download: bool) -> Raw:
    """CIFAR-10 from the python batches (`cifar-10-batches-py/data_batch_1..5`, `test_batch`)."""
    base = Path(root).expanduser() if root is not None else DOWNLOAD_ROOT
    folder = base / "cifar-10-batches-py"
    if not folder.is_dir() and (base / "data_batch_1").is_file():
        folder = base
    if not (folder / "test_batch").is_file():
        if download:
            _torchvision_download("CIFAR10", base)
        else:
            raise SearchsvcError(f"dataset.root: CIFAR-10 batches not found in {folder}; {CIFAR_HINT}")
    train = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    return (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y, 10)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's python batches are pickles of dicts, lists and numpy arrays: nothing else may load, so a
    tampered file cannot run code (as `torch.load(weights_only=True)` does for checkpoints)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # The official python release is a pickle: read with an unpickler that loads data, never code.
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnly(handle, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as err:
        raise SearchsvcError(f"dataset file {path} is not a CIFAR-10 python batch: {err}") from None
    return torch.from_numpy(data.copy()), torch.from_numpy(labels)
