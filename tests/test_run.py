"""End to end through the CLI and the Python API: config → store → data → teacher → run record → results."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import searchsvc
from searchsvc.cli import main
from searchsvc.reporting.table import write_results
from storage import LocalStore, open_store
from workers.training.teacher import load_teacher

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
FAST = ["--no-progress", "--set", "teacher.epochs=2", "--set", "dataset.synthetic.train_size=512"]


def _run(store: str, *extra: str) -> int:
    return main(["run", str(SMOKE), "--store", store, *FAST, *extra])


def test_run_records_config_teacher_and_results(tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert _run(str(store_dir)) == 0
    out = capsys.readouterr().out
    store = LocalStore(store_dir)
    run_id = store.list("runs/")[0].split("/")[1]
    assert f"run {run_id}" in out
    record = store.get_json(f"runs/{run_id}/run.json")
    assert record["status"] == "finished" and record["teacher_cached"] is False
    assert record["evaluations"] == 0
    config_text = store.get_bytes(f"runs/{run_id}/config.yaml").decode()
    assert "epochs: 2" in config_text and "distill:" in config_text  # resolved: defaults filled in
    assert store.exists(f"runs/{run_id}/results.parquet")
    teacher_prefix = f"teachers/{record['teacher_hash']}"
    assert set(store.verify(teacher_prefix)) == {"model.pt", "meta.json"}


def test_second_run_loads_the_teacher_from_the_store(tmp_path, caplog):
    store_dir = str(tmp_path / "store")
    assert _run(store_dir) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _run(store_dir) == 0
    assert any("loaded from" in r.getMessage() for r in caplog.records)
    assert not any("training teacher" in r.getMessage() for r in caplog.records)
    store = LocalStore(store_dir)
    runs = sorted({k.split("/")[1] for k in store.list("runs/")})
    records = [store.get_json(f"runs/{r}/run.json") for r in runs]
    assert [r["teacher_cached"] for r in records] == [False, True]
    assert records[0]["teacher_hash"] == records[1]["teacher_hash"]


def test_stored_teacher_reproduces_its_outputs(tmp_path):
    config = searchsvc.load_config(SMOKE, ["teacher.epochs=1", "dataset.synthetic.train_size=256"])
    result = searchsvc.run(config, store=str(tmp_path / "s"), progress=False)
    teacher = load_teacher(LocalStore(tmp_path / "s"), result.teacher_hash)
    x = torch.randn(4, 1, 16, 16)
    assert teacher.model(x).shape == (4, 4)
    assert teacher.meta["test_accuracy"] == pytest.approx(result.teacher_accuracy)
    # loads with weights_only=True: the saved file is a plain state_dict
    raw = LocalStore(tmp_path / "s").get_bytes(f"teachers/{result.teacher_hash}/model.pt")
    import io

    state = torch.load(io.BytesIO(raw), weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in teacher.model.state_dict().items())


def test_a_teacher_stored_without_validation_accuracy_gets_it_once_beside_it(tmp_path, monkeypatch):
    """Teachers stored before validation decided have no val_accuracy in their (write-once) meta.json: it is
    computed on first load, recorded under teachers/<hash>/validation/ with its own manifest, then read back."""
    import workers.training.teacher as teachers

    config = searchsvc.load_config(SMOKE, ["teacher.epochs=1", "dataset.synthetic.train_size=256"])
    first = searchsvc.run(config, store=str(tmp_path / "new"), progress=False)
    new = LocalStore(tmp_path / "new")
    prefix = f"teachers/{first.teacher_hash}"
    meta = new.get_json(f"{prefix}/meta.json")
    expected = meta.pop("val_accuracy")
    old = LocalStore(tmp_path / "old")  # the same teacher as an older version stored it
    teachers._save(old, prefix, load_teacher(new, first.teacher_hash).model, meta)
    second = searchsvc.run(config, store=old, progress=False)
    record = old.get_json(f"runs/{second.run_id}/run.json")
    assert record["teacher_cached"] and record["teacher_val_accuracy"] == pytest.approx(expected)
    assert set(old.verify(f"{prefix}/validation")) == {"val.json"}
    assert "val_accuracy" not in old.get_json(f"{prefix}/meta.json")  # the teacher's own files are untouched
    monkeypatch.setattr(teachers, "evaluate_split", lambda *a, **k: pytest.fail("computed again"))
    third = searchsvc.run(config, store=old, progress=False)
    assert old.get_json(f"runs/{third.run_id}/run.json")["teacher_val_accuracy"] == pytest.approx(expected)


def test_corrupt_teacher_checkpoint_is_a_clear_error(tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert _run(str(store_dir)) == 0
    store = LocalStore(store_dir)
    model_key = next(k for k in store.list("teachers/") if k.endswith("model.pt"))
    (store_dir / model_key).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert _run(str(store_dir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupt" in err[0] and "model.pt" in err[0]


def test_failed_run_is_recorded_and_keeps_earlier_runs(tmp_path, capsys):
    store_dir = tmp_path / "store"
    assert _run(str(store_dir)) == 0
    store = LocalStore(store_dir)
    before = {k: store.get_bytes(k) for k in store.list()}
    code = main(["run", str(SMOKE), "--store", str(store_dir), "--no-progress", "--set", "dataset.name=fashion_mnist",
                 "--set", f"dataset.root={tmp_path / 'nowhere'}", "--set", "dataset.download=false"])
    assert code == 2
    assert "dataset.root" in capsys.readouterr().err
    for key, data in before.items():
        assert store.get_bytes(key) == data
    failed = [store.get_json(k) for k in store.list("runs/") if k.endswith("run.json")]
    assert sorted(r["status"] for r in failed) == ["failed", "finished"]


def test_results_json_lists_ranked_rows(tmp_path, capsys, make_row):
    store_dir = tmp_path / "store"
    assert _run(str(store_dir)) == 0
    store = LocalStore(store_dir)
    run_id = store.list("runs/")[0].split("/")[1]
    rows = [make_row(spec_hash=f"h{i}", method="n2n", run_id=run_id, status="ok", accuracy=0.5 + i / 10,
                     params=100 - i, macs=1000, compression=2.0, reward=i / 10, artifact=None) for i in range(3)]
    write_results(store, run_id, rows)
    capsys.readouterr()
    assert main(["results", "--store", str(store_dir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["spec_hash"] for r in listed] == ["h2", "h1", "h0"]
    for key in ("spec_hash", "method", "accuracy", "params", "macs", "compression", "reward", "artifact"):
        assert key in listed[0]
    assert main(["results", "--store", str(store_dir), "--run", run_id, "--top", "1"]) == 0
    table = capsys.readouterr().out
    assert "h2" in table and "h1" not in table
    assert searchsvc.results(str(store_dir)).num_rows == 3


@pytest.mark.parametrize("args, fragment", [
    (["--run", "no-such-run"], "run 'no-such-run' does not exist"),
    (["--run", "../etc"], "invalid run id"),
    (["--top", "0"], "--top"),
])
def test_results_bad_input_exits_2(tmp_path, capsys, args, fragment):
    store_dir = tmp_path / "store"
    assert _run(str(store_dir)) == 0
    capsys.readouterr()
    assert main(["results", "--store", str(store_dir), *args]) == 2
    assert fragment in capsys.readouterr().err


def test_results_on_a_missing_store_exits_2(tmp_path, capsys):
    assert main(["results", "--store", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.s3
def test_run_on_s3_keeps_secrets_out_of_store_and_output(s3_env, capsys):
    uri = f"s3://{s3_env.shared_bucket}/e2e"
    assert _run(uri, "--s3-endpoint", s3_env.endpoint) == 0
    captured = capsys.readouterr()
    store = open_store(uri, endpoint=s3_env.endpoint)
    keys = store.list()
    assert any(k.endswith("config.yaml") for k in keys) and any(k.startswith("teachers/") for k in keys)
    blobs = [store.get_bytes(k) for k in keys] + [captured.out.encode(), captured.err.encode()]
    for blob in blobs:
        assert s3_env.secret_key.encode() not in blob
        assert s3_env.access_key.encode() not in blob
    assert searchsvc.results(uri, endpoint=s3_env.endpoint).num_rows == 0


@pytest.mark.s3
def test_run_to_a_missing_bucket_exits_2_with_one_line(s3_env, capsys):
    assert _run("s3://no-such-bucket-here/x", "--s3-endpoint", s3_env.endpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"searchsvc: error: bucket 'no-such-bucket-here' does not exist at {s3_env.endpoint}; "
                   f"create it first"]


def test_teacher_learns_the_smoke_task(tmp_path):
    """The smoke teacher (6 epochs of tiny_cnn on 4-class synthetic data) is far above chance (25 %)."""
    result = searchsvc.run(searchsvc.load_config(SMOKE), store=str(tmp_path / "s"), progress=False)
    assert result.teacher_accuracy > 0.6
    history = load_teacher(LocalStore(tmp_path / "s"), result.teacher_hash).meta["history"]
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
