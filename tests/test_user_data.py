"""Issue 36: the user's own data — a dataset from their code (map-style, iterable, PIL images, inputs their own
transform normalised), explicit validation splits (theirs, or an image folder's val/), where each split came from
and its size in run.json, runs of grid and taylor on it, and every mistake as one line with exit 2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from searchsvc.cli import main
from tests.conftest import REPO
from tests.user_data import factories
from workers.data.datasets import DatasetConfig, load_dataset, normalize
from workers.data.streaming import Streamed, count, take
from workers.data.streaming import batches as split_batches
from workers.evaluation.spec import CandidateSpec
from workers.models.zoo import create_model
from workers.training.train import Recipe, TrainConfig, train_model

FACTORIES = "tests.user_data.factories"


def _python(name: str, **kwargs) -> DatasetConfig:
    return DatasetConfig(name="python", factory=f"{FACTORIES}:{name}", kwargs=kwargs)


def _rows(store: Path, run_id: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in (store / "runs" / run_id / "evals").glob("*.json")]


def _only_run(store: Path) -> tuple[str, dict]:
    (run,) = (store / "runs").iterdir()
    return run.name, json.loads((run / "run.json").read_text())


def test_a_python_dataset_with_its_own_validation_split_is_used_as_given():
    splits = load_dataset(_python("images", train=96, val=40, test=24))
    given = factories.images(train=96, val=40, test=24)
    assert splits.sizes() == {"train": 96, "val": 40, "test": 24} and splits.num_classes == 4
    as_rows = lambda x: {bytes(row.numpy()) for row in x.flatten(1)}  # noqa: E731 — the same images, any order
    for name in ("train", "val", "test"):
        x, y = getattr(splits, name)
        assert x.dtype == torch.uint8 and as_rows(x) == as_rows(given[name].tensors[0])
        assert torch.bincount(y, minlength=4).tolist() == torch.bincount(given[name].tensors[1], minlength=4).tolist()
    assert splits.provenance()["val"] == {"from": f"python {FACTORIES}:images 'val'", "size": 40}


def test_without_val_the_python_dataset_is_carved_and_floats_are_taken_as_the_users_transform_left_them():
    splits = load_dataset(_python("normalised", train=200, test=50))
    assert splits.sizes() == {"train": 180, "val": 20, "test": 50}  # val_fraction 0.1 of train
    assert "10% of" in splits.provenance()["val"]["from"] and "the rest of" in splits.provenance()["train"]["from"]
    x = splits.train[0]
    assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
    assert torch.equal(normalize(x[:4], splits.mean, splits.std), x[:4])  # not divided by 255 nor standardised
    assert abs(float(x.mean())) < 1.5  # the user's normalisation: around 0, not 0..255


def test_pil_images_and_numpy_targets_become_uint8_tensors():
    splits = load_dataset(_python("pil"))
    assert splits.train[0].dtype == torch.uint8 and splits.inputs.shape == (3, 12, 12)
    assert splits.num_classes == 3 and splits.train[1].dtype == torch.int64


def test_a_python_dataset_is_part_of_the_candidates_identity():
    train = TrainConfig()
    spec = lambda dataset: CandidateSpec(arch="tiny_cnn", teacher="t", dataset=dataset, train=train)  # noqa: E731
    one, again = spec(_python("images", train=96)), spec(_python("images", train=96))
    assert one.spec_hash == again.spec_hash and hash(one) == hash(again)
    assert one.spec_hash != spec(_python("images", train=97)).spec_hash
    assert spec(DatasetConfig()).spec_hash == spec(DatasetConfig(kwargs={})).spec_hash  # others: unchanged


def _image_folder(root: Path, counts: dict[str, int]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in counts.items():
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8) // (2 if label == "cat" else 1)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")


def test_an_image_folder_with_val_uses_it_and_says_so(tmp_path):
    _image_folder(tmp_path, {"train": 6, "val": 3, "test": 2})
    splits = load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8))
    assert splits.sizes() == {"train": 12, "val": 6, "test": 4}  # val/ as given: nothing carved from train
    assert splits.provenance()["val"] == {"from": str(tmp_path / "val"), "size": 6}
    (tmp_path / "val" / "bird").mkdir()
    (tmp_path / "val" / "bird" / "0.png").write_bytes((tmp_path / "val" / "cat" / "0.png").read_bytes())
    with pytest.raises(Exception, match="bird is a class train/ does not have"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path), image_size=8))


def _config(folder: Path, method: str, dataset: dict, **sections) -> Path:
    base = yaml.safe_load((REPO / "configs" / f"{method}-smoke.yaml").read_text())
    base.update(dataset=dataset, **sections)
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.mark.parametrize("method", ["grid", "taylor"])
def test_grid_and_taylor_run_on_a_python_dataset_and_record_its_splits(method, tmp_path, ray_session):
    dataset = {"name": "python", "factory": f"{FACTORIES}:images", "kwargs": {"train": 384, "val": 96, "test": 64}}
    sections = {"teacher": {"arch": "tiny_cnn", "epochs": 2, "batch_size": 128}}
    if method == "taylor":
        sections["search"] = {"iterations": 2, "filters_per_iteration": 0.1, "importance_batches": 2,
                              "stop": {"max_drop": 100}, "tune": {"grace_period": 2}}
    else:
        sections["search"] = {"round_to": 1, "candidates": [{"scale": 0.5}]}
    store = tmp_path / "store"
    assert main(["run", str(_config(tmp_path, method, dataset, **sections)), "--store", str(store),
                 "--no-progress"]) == 0
    run_id, record = _only_run(store)
    assert record["data"] == {"train": {"from": f"python {FACTORIES}:images 'train'", "size": 384},
                              "val": {"from": f"python {FACTORIES}:images 'val'", "size": 96},
                              "test": {"from": f"python {FACTORIES}:images 'test'", "size": 64}}
    rows = _rows(store, run_id)
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert all(r["params"] < 5020 for r in rows)  # smaller than the tiny_cnn teacher: real cuts on this data


BAD = {
    "no such module": ("validate", f"{FACTORIES.replace('factories', 'nowhere')}:images", "cannot import"),
    "no such function": ("validate", f"{FACTORIES}:nothing", "has no callable 'nothing'"),
    "not module:function": ("validate", "justaname", "is not package.module:function"),
    "exits": ("run", f"{FACTORIES}:exits", "raised SystemExit"),
    "raises": ("run", f"{FACTORIES}:raises", "raised FileNotFoundError: /data/mine"),
    "a list": ("run", f"{FACTORIES}:a_list", "returned list; expected a dict of splits"),
    "no test": ("run", f"{FACTORIES}:no_test", "no 'test' split"),
    "not a dataset": ("run", f"{FACTORIES}:a_count", "is of type int, not a torch Dataset"),
    "empty test": ("run", f"{FACTORIES}:empty_test", "split 'test' is empty"),
    "negative target": ("run", f"{FACTORIES}:negative_target", "is not a class"),
    "NaN": ("run", f"{FACTORIES}:with_nan", "example 5: the input holds NaN"),
    "mixed shapes": ("run", f"{FACTORIES}:mixed_shapes", "one shape and dtype"),
    "an example that cannot be read": ("run", f"{FACTORIES}:broken_item", "image 0.jpg is truncated"),
    "uint8 that is no image": ("run", f"{FACTORIES}:uint8_vectors", "uint8 inputs are images"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_python_dataset_is_one_line_exit_2_and_nothing_stored(case, tmp_path, capsys):
    command, factory, expected = BAD[case]
    config = _config(tmp_path, "grid", {"name": "python", "factory": factory})
    store = tmp_path / "store"
    args = ["validate", str(config)] if command == "validate" else ["run", str(config), "--store", str(store),
                                                                    "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "dataset.factory" in err and "Traceback" not in err, err
    assert not (store / "teachers").exists() and not (store / "candidates").exists()


@pytest.mark.parametrize("dataset, key", [({"name": "python"}, "dataset.factory"),
                                          ({"name": "synthetic", "factory": f"{FACTORIES}:images"}, "dataset.factory"),
                                          ({"name": "synthetic", "kwargs": {"a": 1}}, "dataset.kwargs")])
def test_factory_and_name_python_come_together(dataset, key, tmp_path, capsys):
    capsys.readouterr()
    assert main(["validate", str(_config(tmp_path, "grid", dataset))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err


# ---- streaming: data read batch by batch -------------------------------------------------------------------------

def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    _image_folder(root, {"train": 40, "val": 12, "test": 12})
    return root


def test_other_files_are_other_data_to_every_identity(tmp_path, capsys):
    """A spec and a teacher name their data by a fingerprint of its files (names, sizes, versions), not its path:
    another folder at another path, or a file changed in place, is other data; a worker whose files are not the
    run's stops in one line."""
    from workers.training.teacher import TeacherConfig, teacher_hash

    config = lambda root: DatasetConfig(name="imagefolder", root=str(root), image_size=8)  # noqa: E731
    first, other = _folder(tmp_path / "a"), tmp_path / "b" / "folder"
    _image_folder(other, {"train": 40, "val": 12, "test": 12})
    (other / "train" / "cat" / "0.png").unlink()  # the same names but one: other data
    prints = {root: load_dataset(config(root)).fingerprint for root in (first, other)}
    assert None not in prints.values() and prints[first] != prints[other]
    assert load_dataset(config(first)).fingerprint == prints[first]  # listed again: the same data
    stated = {root: replace(config(root), fingerprint=fp) for root, fp in prints.items()}
    assert len({teacher_hash(TeacherConfig(arch="tiny_cnn"), d) for d in stated.values()}) == 2
    spec = lambda d: CandidateSpec(arch="tiny_cnn", teacher="t", dataset=d, train=TrainConfig())  # noqa: E731
    assert spec(stated[first]).spec_hash != spec(stated[other]).spec_hash
    assert spec(replace(stated[first], root=str(other))).spec_hash == spec(stated[first]).spec_hash  # path: not data
    (first / "test" / "dog" / "1.png").write_bytes(b"\0" * 7)  # another size: another file
    with pytest.raises(Exception, match="are not the data this run started on") as err:
        load_dataset(stated[first])
    assert len(str(err.value).splitlines()) == 1
    assert load_dataset(DatasetConfig(name="synthetic")).fingerprint is None  # the config names it: hashes as before


def test_a_streamed_folder_holds_no_images_and_reads_the_same_splits_as_memory(tmp_path):
    root = _folder(tmp_path)
    resident = load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8, in_memory=True))
    streamed = load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8, in_memory=False,
                                          workers=1))
    assert not resident.streamed and streamed.streamed and isinstance(streamed.train, Streamed)
    assert streamed.sizes() == resident.sizes() == {"train": 80, "val": 24, "test": 24}
    assert (streamed.mean, streamed.std) == (resident.mean, resident.std)  # every image: the same statistics
    assert streamed.provenance()["val"]["from"] == f"{root / 'val'} (streamed)"
    for name in ("train", "val", "test"):  # the same examples in the same order, read from the files
        x, y = take(getattr(streamed, name), torch.arange(count(getattr(streamed, name))))
        assert torch.equal(x, getattr(resident, name)[0]) and torch.equal(y, getattr(resident, name)[1])
    auto = lambda share: load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8,  # noqa: E731
                                                     memory_share=share))
    assert auto(1e-9).streamed and not auto(0.25).streamed  # auto: by the decoded size against its share


def test_training_on_streamed_data_takes_the_same_steps_as_on_resident_data(tmp_path):
    root = _folder(tmp_path)
    histories = []
    for in_memory in (True, False):
        splits = load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8, in_memory=in_memory,
                                            workers=1))
        torch.manual_seed(0)
        model = create_model("tiny_cnn", 3, 2)
        history = train_model(model, splits, Recipe(epochs=2, batch_size=16, lr=0.05, augment=True),
                              torch.device("cpu"), progress=False)
        histories.append([(round(r["loss"], 5), r["val_accuracy"], r["test_accuracy"]) for r in history])
    assert histories[0] == histories[1]  # the same batches in the same order, the same augmentation


def test_a_run_on_a_streamed_folder_finds_the_candidates_the_resident_run_finds(tmp_path, ray_session):
    root = _folder(tmp_path)
    found = {}
    for in_memory in (True, False):
        dataset = {"name": "imagefolder", "root": str(root), "image_size": 8, "in_memory": in_memory, "workers": 1}
        store = tmp_path / f"store-{in_memory}"
        config = _config(tmp_path, "grid", dataset, teacher={"arch": "tiny_cnn", "epochs": 2, "batch_size": 32},
                         search={"round_to": 1, "candidates": [{"scale": 0.5}, {"remove": ["layer1.0"]}]})
        assert main(["run", str(config), "--store", str(store), "--no-progress"]) == 0
        run_id, record = _only_run(store)
        assert record["data"]["train"]["size"] == 80 and ("(streamed)" in record["data"]["train"]["from"]) \
            == (not in_memory)
        found[in_memory] = {r["spec_hash"]: (r["status"], r["val_accuracy"], r["params"]) for r in _rows(store, run_id)}
    assert found[True] == found[False] and len(found[True]) == 2  # same candidates, same figures
    # a kept candidate's spec records what its data is, not where: quantize reads it where the run read it
    spec_hash = next(h for h, (status, _, _) in found[False].items() if status == "ok")
    assert main(["quantize", "--store", str(store), spec_hash, "--calibration-batches", "1"]) == 0


def test_an_iterable_dataset_cannot_stream_in_a_shuffled_order(tmp_path, capsys):
    config = _config(tmp_path, "grid", {"name": "python", "factory": f"{FACTORIES}:normalised", "in_memory": False})
    capsys.readouterr()
    assert main(["run", str(config), "--store", str(tmp_path / "store"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "iterable dataset" in err and "in_memory: true" in err, err


@pytest.mark.parametrize("workers", [0, 1])
def test_a_map_style_python_dataset_streams_through_its_own_getitem(workers):
    """Its targets (no `targets` attribute) read by a pass of the split's decode workers, its examples when read."""
    splits = load_dataset(DatasetConfig(name="python", factory=f"{FACTORIES}:images",
                                        kwargs={"train": 300, "val": 16, "test": 16}, in_memory=False,
                                        workers=workers))
    resident = load_dataset(_python("images", train=300, val=16, test=16))
    assert splits.streamed and splits.sizes() == resident.sizes() and splits.mean == resident.mean
    assert torch.equal(splits.train.labels.sort().values, resident.train[1].sort().values)
    x, y = take(splits.val, torch.arange(16))
    assert torch.equal(x, resident.val[0]) and torch.equal(y, resident.val[1])


# ---- data on S3 ----------------------------------------------------------------------------------------------------

def _upload(s3, folder: Path, bucket: str, prefix: str) -> None:
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


@pytest.mark.s3
def test_an_image_folder_on_s3_is_read_where_it_is_as_the_local_one(tmp_path, s3_env):
    root = _folder(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image: not listed")
    bucket = s3_env.new_bucket()
    _upload(s3_env, root, bucket, "data/pets")
    local = load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8))
    for in_memory in (True, False):
        config = DatasetConfig(name="imagefolder", root=f"s3://{bucket}/data/pets", image_size=8, in_memory=in_memory,
                               workers=1)
        remote = load_dataset(config, endpoint=s3_env.endpoint)
        assert remote.streamed == (not in_memory) and remote.sizes() == local.sizes()
        assert remote.provenance()["val"]["from"].startswith(f"s3://{bucket}/data/pets/val")
        for name in ("train", "val", "test"):  # the same images, in the same order, as the folder on disk
            x, y = take(getattr(remote, name), torch.arange(count(getattr(remote, name))))
            assert torch.equal(x, getattr(local, name)[0]) and torch.equal(y, getattr(local, name)[1])
        assert remote.fingerprint == load_dataset(config, endpoint=s3_env.endpoint).fingerprint  # sizes and ETags
    replaced = (root / "train" / "dog" / "0.png").read_bytes()
    s3_env.client().put_object(Bucket=bucket, Key="data/pets/train/cat/0.png", Body=replaced)
    assert load_dataset(config, endpoint=s3_env.endpoint).fingerprint != remote.fingerprint  # a file replaced
    with pytest.raises(Exception, match=f"s3://{bucket}/data/nothing/ has no class sub-folders"):
        load_dataset(DatasetConfig(name="imagefolder", root=f"s3://{bucket}/data/nothing/"), s3_env.endpoint)


@pytest.mark.parametrize("in_memory", [True, False])
def test_an_unreadable_image_stops_naming_it_or_is_skipped(tmp_path, in_memory):
    root = _folder(tmp_path)
    (root / "train" / "dog" / "7.png").write_bytes(b"truncated")
    config = DatasetConfig(name="imagefolder", root=str(root), image_size=8, in_memory=in_memory, workers=1)
    with pytest.raises(Exception, match=f"dataset file {root}/train/dog/7.png is not a readable image"):
        splits = load_dataset(config)
        list(split_batches(splits.train, 16))  # streamed: found when its batch is read
    skipped = load_dataset(replace(config, bad_files="skip"))
    images, labels = take(skipped.train, torch.arange(count(skipped.train)))
    assert len(images) == (79 if in_memory else 80)  # left out, or stood in for by the next readable one
    assert images.shape[1:] == (3, 8, 8)


def test_data_too_large_for_memory_is_one_line_or_streams(tmp_path, monkeypatch):
    from workers.data import streaming

    root = _folder(tmp_path)
    monkeypatch.setattr(streaming, "available_memory", lambda: 30_000)  # bytes: less than the 24 KiB decoded x 2
    with pytest.raises(Exception, match="more than 50% of the 0.0 GiB of memory available; set dataset.in_memory"):
        load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8, in_memory=True))
    assert load_dataset(DatasetConfig(name="imagefolder", root=str(root), image_size=8)).streamed  # auto
    with pytest.raises(Exception, match="an iterable one is decoded whole"):
        load_dataset(_python("normalised"))  # iterable: cannot stream, and does not fit


@pytest.mark.parametrize("value, says", [("maybe", "must be true, false or auto; got 'maybe'"),
                                         (False, "synthetic is always held in memory")])
def test_in_memory_takes_true_false_or_auto_where_the_data_can_stream(value, says, tmp_path, capsys):
    config = _config(tmp_path, "grid", {"name": "synthetic", "in_memory": value})
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dataset.in_memory" in err and says in err, err


@pytest.mark.parametrize("key, value", [("image_size", 8), ("channels", 3)])
def test_streamed_python_data_is_not_converted_silently(key, value):
    """Resident data is resized and given channels here; streamed data is read as the dataset gives it: asking for
    another size or channel count is one line, not a silent mismatch between the two paths."""
    config = DatasetConfig(name="python", factory=f"{FACTORIES}:images", kwargs={"train": 64, "val": 16, "test": 16},
                           in_memory=False, workers=0, **{key: value})
    with pytest.raises(Exception, match=f"dataset.{key}: streamed data is read as its source gives it"):
        load_dataset(config)
    assert load_dataset(replace(config, in_memory=True)).train[0].shape[1:] == ((1, 8, 8) if key == "image_size"
                                                                                  else (3, 16, 16))


def test_the_console_script_finds_a_factory_in_the_folder_it_runs_in(tmp_path):
    """`searchsvc` (the console script, not `python -m`) imports "package.module:function" from the folder it is
    run in, as the README's `searchsvc run configs/your-data-grid.yaml` needs (examples.your_data)."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "mydata.py").write_text((REPO / "tests" / "user_data" / "factories.py").read_text())
    config = _config(tmp_path, "grid", {"name": "python", "factory": "mydata:images"})
    script = shutil.which("searchsvc", path=str(Path(sys.executable).parent))
    done = subprocess.run([script, "validate", str(config)], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
