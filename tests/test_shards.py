"""Issue 36, sharded data: Parquet shards (an `image` column of encoded bytes, a `label` column) on disk or on S3,
written from an image folder, read whole or row group by row group, shuffled block by block, and every mistake in
them as one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.errors import SearchsvcError
from searchsvc.cli import main
from tests.conftest import REPO
from tests.test_user_data import _config, _image_folder, _only_run, _rows, _upload
from workers.data import shards
from workers.data.datasets import DatasetConfig, load_dataset
from workers.data.streaming import Streamed, batches, count, epoch_order, take

ROWS_PER_GROUP, SHARD_ROWS = 8, 20  # rows: 40 training images of a class make 2 x 2 shards of 3 row groups


def _folder_and_shards(tmp_path: Path, counts: dict[str, int] | None = None) -> tuple[Path, Path]:
    folder, sharded = tmp_path / "folder", tmp_path / "shards"
    _image_folder(folder, counts or {"train": 40, "val": 12, "test": 12})
    shards.write(str(folder), str(sharded), rows_per_group=ROWS_PER_GROUP, shard_rows=SHARD_ROWS)
    return folder, sharded


def _shards(root: Path | str, **settings) -> DatasetConfig:
    return DatasetConfig(name="shards", root=str(root), image_size=8, **{"workers": 1, **settings})


def _examples(split) -> list[bytes]:
    """A split's (image, label) pairs as sortable bytes: the same examples, in any order."""
    x, y = take(split, torch.arange(count(split)))
    return sorted(bytes(image.numpy()) + bytes([label]) for image, label in zip(x, y.tolist()))


def test_shards_written_from_an_image_folder_read_as_the_folder_reads(tmp_path):
    folder, sharded = _folder_and_shards(tmp_path)
    assert sorted(p.name for p in (sharded / "train").iterdir()) == [f"shard-0000{i}.parquet" for i in range(4)]
    first = pq.ParquetFile(sharded / "train" / "shard-00000.parquet").metadata
    assert [first.row_group(g).num_rows for g in range(first.num_row_groups)] == [8, 8, 4]
    assert (sharded / "classes.txt").read_text() == "cat\ndog\n"
    resident = load_dataset(_shards(sharded, in_memory=True))
    images = load_dataset(DatasetConfig(name="imagefolder", root=str(folder), image_size=8, in_memory=True))
    assert not resident.streamed and resident.sizes() == images.sizes() == {"train": 80, "val": 24, "test": 24}
    assert resident.num_classes == 2 and resident.train[0].shape[1:] == (3, 8, 8)  # resized by dataset.image_size
    for name in ("train", "val", "test"):
        assert _examples(getattr(resident, name)) == _examples(getattr(images, name))
    assert resident.provenance()["train"] == {"from": f"{sharded / 'train'} (4 Parquet shards)", "size": 80}


def test_streamed_shards_give_the_resident_examples_and_statistics(tmp_path):
    _, sharded = _folder_and_shards(tmp_path)
    resident = load_dataset(_shards(sharded, in_memory=True))
    streamed = load_dataset(_shards(sharded, in_memory=False))
    assert streamed.streamed and isinstance(streamed.val, Streamed) and streamed.sizes() == resident.sizes()
    assert (streamed.mean, streamed.std) == (resident.mean, resident.std)  # every training image, both ways
    assert streamed.provenance()["val"]["from"].endswith("(2 Parquet shards) (streamed)")
    for name in ("train", "val", "test"):  # the same examples in the same (storage) order: one set of cached logits
        x, y = take(getattr(streamed, name), torch.arange(count(getattr(streamed, name))))
        assert torch.equal(x, getattr(resident, name)[0]) and torch.equal(y, getattr(resident, name)[1])
    assert load_dataset(_shards(sharded, memory_share=1e-9)).streamed  # auto: by the decoded size
    assert not load_dataset(_shards(sharded)).streamed


def _runs(order: torch.Tensor, blocks: torch.Tensor) -> list[int]:
    """The row group of each run of consecutive examples from one row group, in order."""
    of = blocks[order].tolist()
    return [b for i, b in enumerate(of) if i == 0 or of[i - 1] != b]


def test_a_sharded_epoch_goes_row_group_by_row_group_in_a_seeded_random_order(tmp_path):
    _, sharded = _folder_and_shards(tmp_path)
    train = load_dataset(_shards(sharded, in_memory=False)).train
    blocks = train.blocks
    order = epoch_order(train, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(count(train)))  # a permutation
    runs = _runs(order, blocks)
    assert sorted(runs) == sorted(set(blocks.tolist()))  # each row group once: one run of its examples
    assert runs != sorted(runs)  # the row groups shuffled (12 of them: sorted by chance 1 in 12!)
    assert torch.equal(order, epoch_order(train, torch.Generator().manual_seed(3)))
    assert not torch.equal(order, epoch_order(train, torch.Generator().manual_seed(4)))
    first = order[: int((blocks == blocks[order[0]]).sum())]  # the first row group's examples, shuffled within it
    assert not torch.equal(first, first.sort().values) or len(first) < 3


def test_resident_and_per_example_splits_keep_torch_randperm_as_their_epoch_order(tmp_path):
    folder, sharded = _folder_and_shards(tmp_path)
    resident = load_dataset(_shards(sharded, in_memory=True)).train
    per_file = load_dataset(DatasetConfig(name="imagefolder", root=str(folder), image_size=8, in_memory=False)).train
    for split in (resident, per_file):
        assert torch.equal(epoch_order(split, torch.Generator().manual_seed(5)),
                           torch.randperm(count(split), generator=torch.Generator().manual_seed(5)))


def test_a_carved_or_subset_sharded_split_keeps_storage_order_and_its_row_groups(tmp_path):
    """val carved from train (no val/ shards) and `subset` keep the examples the seed picks, in storage order
    (resident and streamed alike), each with its row group, so an epoch still reads row group by row group."""
    _, sharded = _folder_and_shards(tmp_path, {"train": 40, "test": 12})
    whole = load_dataset(_shards(sharded, in_memory=False, val_fraction=0.0)).train
    seeded = torch.randperm(80, generator=torch.Generator().manual_seed(0))  # load_dataset's carve, split_seed 0
    assert sorted(load_dataset(_shards(sharded, in_memory=False)).val.dataset.indices) == sorted(seeded[:8].tolist())
    for settings in ({"val_fraction": 0.25}, {"subset": 30}):
        streamed = load_dataset(_shards(sharded, in_memory=False, **settings))
        resident = load_dataset(_shards(sharded, in_memory=True, **settings))
        for name in ("train", "val", "test"):
            split = getattr(streamed, name)
            x, y = take(split, torch.arange(count(split)))
            assert torch.equal(x, getattr(resident, name)[0]) and torch.equal(y, getattr(resident, name)[1])
            assert torch.equal(split.blocks, split.blocks.sort().values)  # storage order
        kept = streamed.train.dataset.indices  # the whole split's rows it holds, and their row groups
        assert kept == sorted(kept) and torch.equal(streamed.train.blocks, whole.blocks[kept])
        order = epoch_order(streamed.train, torch.Generator().manual_seed(0))
        assert sorted(_runs(order, streamed.train.blocks)) == sorted(set(streamed.train.blocks.tolist()))


def test_a_shuffled_subset_of_a_sharded_split_still_goes_row_group_by_row_group(tmp_path):
    """Streamed.subset keeps any order it is given, each example with its row group: the epoch order groups them."""
    _, sharded = _folder_and_shards(tmp_path)
    train = load_dataset(_shards(sharded, in_memory=False)).train
    index = torch.randperm(count(train), generator=torch.Generator().manual_seed(1))[:50]
    part = train.subset(index)
    assert torch.equal(part.blocks, train.blocks[index]) and part.dataset.indices == index.tolist()
    order = epoch_order(part, torch.Generator().manual_seed(2))
    assert sorted(order.tolist()) == list(range(50))
    assert sorted(_runs(order, part.blocks)) == sorted(set(part.blocks.tolist()))


def test_a_streamed_epoch_reads_each_row_group_once(tmp_path, monkeypatch):
    _, sharded = _folder_and_shards(tmp_path)
    train = load_dataset(_shards(sharded, in_memory=False, workers=0)).train
    reads = []
    real = shards._images
    monkeypatch.setattr(shards, "_images", lambda parquet, group: reads.append(group) or real(parquet, group))
    for _ in batches(train, 16, epoch_order(train, torch.Generator().manual_seed(0))):
        pass
    assert len(reads) == len(set(train.blocks.tolist())) == 12
    reads.clear()
    for _ in batches(train, 16, torch.randperm(count(train), generator=torch.Generator().manual_seed(0))):
        pass
    assert len(reads) > 40  # what a per-example shuffle would cost: a row group for nearly every example


def test_a_grid_run_on_streamed_local_shards(tmp_path, ray_session):
    _, sharded = _folder_and_shards(tmp_path)
    dataset = {"name": "shards", "root": str(sharded), "image_size": 8, "in_memory": False, "workers": 1}
    config = _config(tmp_path, "grid", dataset, teacher={"arch": "tiny_cnn", "epochs": 2, "batch_size": 32},
                     search={"round_to": 1, "candidates": [{"scale": 0.5}]})
    store = tmp_path / "store"
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
    run_id, record = _only_run(store)
    assert record["data"]["train"] == {"from": f"{sharded / 'train'} (4 Parquet shards) (streamed)", "size": 80}
    rows = _rows(store, run_id)
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["val_accuracy"] is not None, rows


@pytest.mark.s3
def test_shards_on_s3_are_read_by_ranges_as_the_local_ones(tmp_path, s3_env, monkeypatch):
    from storage.s3 import S3Store

    _, sharded = _folder_and_shards(tmp_path)
    bucket = s3_env.new_bucket()
    _upload(s3_env, sharded, bucket, "data/pets")
    local = load_dataset(_shards(sharded, in_memory=True))
    fetched = []
    real = S3Store.get_range
    monkeypatch.setattr(S3Store, "get_range", lambda store, key, start, length: fetched.append((key, length))
                        or real(store, key, start, length))
    for in_memory in (True, False):
        remote = load_dataset(_shards(f"s3://{bucket}/data/pets", in_memory=in_memory, workers=0), s3_env.endpoint)
        assert remote.streamed == (not in_memory) and remote.sizes() == local.sizes()
        assert remote.provenance()["test"]["from"].startswith(f"s3://{bucket}/data/pets/test (2 Parquet shards)")
        for name in ("train", "val", "test"):
            assert _examples(getattr(remote, name)) == _examples(getattr(local, name))
    fetched.clear()
    take(remote.test, torch.tensor([0]))  # one row: its shard's footer and one row group's images, by range
    size = (sharded / "test" / "shard-00000.parquet").stat().st_size  # bytes
    assert fetched and sum(length for _, length in fetched) < size
    with pytest.raises(SearchsvcError, match=f"s3://{bucket}/data/nothing has no train/\\*.parquet"):
        load_dataset(_shards(f"s3://{bucket}/data/nothing"), s3_env.endpoint)


@pytest.mark.s3
def test_a_grid_run_reads_streamed_shards_from_s3_through_the_stores_endpoint(tmp_path, s3_env):
    """In a process of its own (its own Ray, started with the test server's credentials in its environment, as a
    node's would be): data and store on S3, the endpoint given once, with --s3-endpoint."""
    _, sharded = _folder_and_shards(tmp_path)
    bucket = s3_env.new_bucket()
    _upload(s3_env, sharded, bucket, "data/pets")
    dataset = {"name": "shards", "root": f"s3://{bucket}/data/pets", "image_size": 8, "in_memory": False,
               "workers": 1}
    config = _config(tmp_path, "grid", dataset, teacher={"arch": "tiny_cnn", "epochs": 1, "batch_size": 32},
                     search={"round_to": 1, "candidates": [{"scale": 0.5}]})
    store = f"s3://{bucket}/store"
    done = subprocess.run([sys.executable, "-m", "searchsvc", "run", str(config), "--store", store, "--s3-endpoint",
                           s3_env.endpoint, "--no-progress"], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = s3_env.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="store/runs/")["Contents"]]
    (run_json,) = [k for k in keys if k.endswith("/run.json")]
    record = json.loads(client.get_object(Bucket=bucket, Key=run_json)["Body"].read())
    assert record["data"]["train"]["from"] == f"s3://{bucket}/data/pets/train (4 Parquet shards) (streamed)"
    evals = [json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read()) for k in keys if "/evals/" in k]
    assert len(evals) == 1 and evals[0]["status"] == "ok", evals


# ---- bad input -----------------------------------------------------------------------------------------------------

def _shard(path: Path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 7, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _good(root: Path, split: str, rows: int = 3) -> None:
    _shard(root / split / "a.parquet", image=pa.array([_png()] * rows, pa.binary()), label=list(range(rows)))


def _bad_image_column(root: Path) -> None:
    _good(root, "test")
    _shard(root / "train" / "a.parquet", image=pa.array([_png(), b"not a png"], pa.binary()), label=[0, 1])


BAD = {
    "no train": (lambda root: _good(root, "test"), "has no train/*.parquet: sharded data is train/*.parquet"),
    "neither": (lambda root: _good(root, "elsewhere"), "has no train/*.parquet and no test/*.parquet"),
    "no image column": (lambda root: (_good(root, "test"), _shard(root / "train" / "a.parquet", label=[0, 1])),
                        "train/a.parquet has no column 'image' (encoded image bytes (binary)); it has label"),
    "no label column": (lambda root: (_good(root, "train"), _shard(root / "test" / "b.parquet",
                                                                   image=pa.array([_png()], pa.binary()))),
                        "test/b.parquet has no column 'label'"),
    "float labels": (lambda root: (_good(root, "test"), _shard(root / "train" / "a.parquet", image=pa.array(
        [_png()], pa.binary()), label=[0.5])), "train/a.parquet: column 'label' holds double, not integer class"),
    "negative label": (lambda root: (_good(root, "test"), _shard(root / "train" / "a.parquet", image=pa.array(
        [_png()] * 3, pa.binary()), label=[0, 1, -2])), "train/a.parquet: label -2 in row 2 is not a class"),
    "empty split": (lambda root: (_good(root, "train"), _shard(root / "test" / "a.parquet", image=pa.array(
        [], pa.binary()), label=pa.array([], pa.int64()))), "test holds no rows (an empty split)"),
    "not parquet": (lambda root: (_good(root, "train"), (root / "test").mkdir(),
                                  (root / "test" / "x.parquet").write_bytes(b"PK\x03\x04 a zip")),
                    "test/x.parquet is not a readable Parquet file"),
    "an image that is no image": (_bad_image_column, "train/a.parquet row 1 is not a readable image"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_shards_are_one_line_exit_2_and_nothing_stored(case, tmp_path, capsys):
    make, expected = BAD[case]
    root = tmp_path / "data"
    root.mkdir()
    make(root)
    config = _config(tmp_path, "grid", {"name": "shards", "root": str(root), "image_size": 8, "in_memory": True})
    store = tmp_path / "store"
    capsys.readouterr()
    assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert not (store / "teachers").exists() and not (store / "candidates").exists()


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_undecodable_row_stops_naming_its_file_and_row_or_is_skipped(tmp_path, in_memory):
    root = tmp_path / "data"
    _bad_image_column(root)
    config = _shards(root, in_memory=in_memory, workers=0)
    with pytest.raises(SearchsvcError, match=f"dataset file {root}/train/a.parquet row 1 is not a readable image"):
        splits = load_dataset(config)
        list(batches(splits.train, 2))  # streamed: found when its batch is read
    skipped = load_dataset(replace(config, bad_files="skip"))
    images, labels = take(skipped.train, torch.arange(count(skipped.train)))
    assert len(images) == (1 if in_memory else 2)  # left out, or stood in for by the next readable row
    assert (images == images[0]).all() and images.shape[1:] == (3, 8, 8)


def test_the_writer_command_makes_shards_and_refuses_a_folder_that_is_none(tmp_path, capsys):
    folder = tmp_path / "folder"
    _image_folder(folder, {"train": 3, "test": 2})
    assert shards.main(["write", str(folder), str(tmp_path / "out"), "--rows-per-group", "2"]) == 0
    assert "train: 6 rows, test: 4 rows" in capsys.readouterr().out
    assert load_dataset(_shards(tmp_path / "out")).sizes()["test"] == 4
    assert shards.main(["write", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'nowhere'} is not a folder" in err, err
