"""Issue 34: no unverified byte decides anything. Eval rows and run.json carry the checksum of their content (and an
ok row agrees with its candidate's manifest-checked metrics.json); a cache hit checks the model bytes it reuses; a
corrupt teacher file stops the run. Every refusal is one line, exit 2, naming the file; the store is not changed.

Each test damages a copy of the shared grid run's store (`grid_report`) and runs the CLI in this process.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from searchsvc.cli import main
from storage import CorruptArtifactError, LocalStore
from storage.base import RECORD_SHA256, json_bytes, sealed
from tests.conftest import REPO
from workers.training.teacher import load_train_logits

GRID = REPO / "configs" / "grid-smoke.yaml"


def copied(grid_report, tmp_path: Path) -> tuple[Path, LocalStore, str]:
    """A copy of the shared grid run's store: (folder, store, run id)."""
    _, source, run_id = grid_report
    folder = tmp_path / "store"
    shutil.copytree(source, folder)
    return folder, LocalStore(folder), run_id


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command in this process."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_naming(err: str, key: str) -> bool:
    """Whether stderr is one error line that names the file `key`."""
    lines = [line for line in err.splitlines() if line.startswith("searchsvc: error:")]
    return len(lines) == 1 and key in lines[0] and "Traceback" not in err


def edit_json(path: Path, reseal: bool = False, **changes) -> None:
    """Change fields of a stored JSON record in place; `reseal`: recompute its checksum, as a forger would."""
    data = {k: v for k, v in json.loads(path.read_text()).items() if k != RECORD_SHA256 or not reseal}
    data.update(changes)
    path.write_bytes(json_bytes(sealed(data) if reseal else data))


def worst_ok_row(store: LocalStore, run_id: str) -> tuple[str, dict]:
    """(key, row) of the valid row with the lowest reward: the one an edit would lift to the top."""
    rows = {k: json.loads(store.get_bytes(k)) for k in store.list(f"runs/{run_id}/evals/")}
    return min(((k, r) for k, r in rows.items() if r["status"] == "ok"), key=lambda kr: kr[1]["reward"])


def stop_record(store: LocalStore, run_id: str) -> None:
    """Mark the run interrupted the way the run itself writes run.json (sealed anew), so resume takes it."""
    key = f"runs/{run_id}/run.json"
    store.put_json(key, {**store.get_mapping(key), "status": "stopped"})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sealed_record_rewritten_with_changes_stays_sealed_and_an_edit_is_refused(tmp_path):
    store = LocalStore(tmp_path / "store")
    record = sealed({"run_id": "r", "status": "running"})
    record.update(status="finished", wall_s=1.5)  # what the run does between writes of run.json
    store.put_json("runs/r/run.json", record)
    stored = json.loads(store.get_bytes("runs/r/run.json"))
    assert stored[RECORD_SHA256] == sealed({"run_id": "r", "status": "finished", "wall_s": 1.5})[RECORD_SHA256]
    assert store.get_mapping("runs/r/run.json")["status"] == "finished"
    edit_json(store.root / "runs/r/run.json", status="running")
    with pytest.raises(CorruptArtifactError, match="runs/r/run.json is corrupt: its content does not match"):
        store.get_mapping("runs/r/run.json")


def test_an_edited_eval_row_is_refused_by_report_and_never_shown_by_results(grid_report, tmp_path, capsys):
    folder, store, run_id = copied(grid_report, tmp_path)
    key, row = worst_ok_row(store, run_id)
    edit_json(folder / key, val_accuracy=0.999, reward=9.0)
    before = snapshot(folder)
    code, _, err = cli(["report", "--store", str(folder), "--run", run_id, "-o", str(tmp_path / "r.html")], capsys)
    assert code == 2 and one_line_naming(err, key), err
    assert "record_sha256" in err
    code, out, _ = cli(["results", "--store", str(folder), "--run", run_id, "--json"], capsys)
    shown = {r["spec_hash"]: r for r in json.loads(out)}
    assert code == 0 and shown[row["spec_hash"]]["val_accuracy"] == row["val_accuracy"]
    assert shown[row["spec_hash"]]["reward"] == row["reward"] and json.loads(out)[0]["spec_hash"] != row["spec_hash"]
    assert snapshot(folder) == before


def test_a_resealed_row_that_disagrees_with_its_candidates_metrics_is_refused(grid_report, tmp_path, capsys):
    """A forger who recomputes the row's checksum still meets the candidate's manifest-checked metrics.json."""
    folder, store, run_id = copied(grid_report, tmp_path)
    key, row = worst_ok_row(store, run_id)
    edit_json(folder / key, reseal=True, val_accuracy=0.999, reward=9.0)
    code, _, err = cli(["report", "--store", str(folder), "--run", run_id, "-o", str(tmp_path / "r.html")], capsys)
    assert code == 2 and one_line_naming(err, key), err
    assert f"its val_accuracy 0.999 is not the {row['val_accuracy']!r}" in err
    assert f"candidates/{row['spec_hash']}/metrics.json" in err


def test_rows_from_before_rows_carried_a_checksum_are_read_when_they_agree_with_their_candidates(
        grid_report, tmp_path, capsys, caplog):
    folder, store, run_id = copied(grid_report, tmp_path)
    keys = store.list(f"runs/{run_id}/evals/")
    for key in keys:  # as an older version wrote them: no checksum
        path = folder / key
        path.write_bytes(json_bytes({k: v for k, v in json.loads(path.read_text()).items() if k != RECORD_SHA256}))
    with caplog.at_level(logging.WARNING):
        code, _, err = cli(["report", "--store", str(folder), "--run", run_id, "-o", str(tmp_path / "r.html")],
                           capsys)
    assert code == 0, err
    assert f"{len(keys)} of its {len(keys)} evaluation rows carry no record_sha256" in caplog.text
    key, row = worst_ok_row(store, run_id)
    edit_json(folder / key, params=row["params"] // 2)
    code, _, err = cli(["report", "--store", str(folder), "--run", run_id, "-o", str(tmp_path / "r.html")], capsys)
    assert code == 2 and one_line_naming(err, key) and f"its params {row['params'] // 2} is not" in err, err


def test_resume_refuses_an_edited_row_before_it_ranks_or_enters_the_results(grid_report, tmp_path, capsys):
    folder, store, run_id = copied(grid_report, tmp_path)
    stop_record(store, run_id)
    key, row = worst_ok_row(store, run_id)
    edit_json(folder / key, reseal=True, val_accuracy=0.999, reward=9.0)
    results = (folder / f"runs/{run_id}/results.parquet").read_bytes()
    code, _, err = cli(["resume", "--store", str(folder), "--run", run_id, "--no-progress"], capsys)
    assert code == 2 and one_line_naming(err, key), err
    assert (folder / f"runs/{run_id}/results.parquet").read_bytes() == results
    code, out, _ = cli(["results", "--store", str(folder), "--run", run_id, "--json"], capsys)
    assert code == 0 and json.loads(out)[0]["spec_hash"] != row["spec_hash"]
    assert 0.999 not in [r["val_accuracy"] for r in json.loads(out)]


def test_an_edited_run_record_is_refused_by_report_and_resume(grid_report, tmp_path, capsys):
    folder, store, run_id = copied(grid_report, tmp_path)
    key = f"runs/{run_id}/run.json"
    edit_json(folder / key, status="stopped", teacher_accuracy=0.99)
    code, _, err = cli(["report", "--store", str(folder), "--run", run_id, "-o", str(tmp_path / "r.html")], capsys)
    assert code == 2 and one_line_naming(err, key), err
    code, _, err = cli(["resume", "--store", str(folder), "--run", run_id, "--no-progress"], capsys)
    assert code == 2 and one_line_naming(err, key), err
    assert json.loads((folder / key).read_text())["teacher_accuracy"] == 0.99  # refused, not rewritten


def test_a_cache_hit_whose_model_bytes_changed_stops_the_run_naming_the_file(grid_report, tmp_path, capsys):
    folder, store, run_id = copied(grid_report, tmp_path)
    model = sorted(folder.glob("candidates/*/model.pt"))[0]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    code, _, err = cli(["run", str(GRID), "--store", str(folder), "--no-progress"], capsys)
    key = str(model.relative_to(folder))
    assert code == 2 and one_line_naming(err, key) and "does not match the manifest" in err, err
    assert not [k for k in new_keys(store, run_id) if f"/evals/{model.parent.name}.json" in k]  # no row of them


def test_corrupt_teacher_logits_stop_the_run_naming_the_file(grid_report, tmp_path, capsys):
    folder, store, run_id = copied(grid_report, tmp_path)
    [logits] = folder.glob("teachers/*/logits/train.pt")
    logits.write_bytes(logits.read_bytes()[:-8])
    code, _, err = cli(["run", str(GRID), "--store", str(folder), "--no-progress"], capsys)
    key = str(logits.relative_to(folder))
    assert code == 2 and one_line_naming(err, key), err
    assert not [k for k in new_keys(store, run_id) if "/evals/" in k]  # no row, invalid or not


def new_keys(store: LocalStore, run_id: str) -> list[str]:
    """The keys of runs other than the shared grid run (the run a test started on its copy)."""
    return [k for k in store.list("runs/") if not k.startswith(f"runs/{run_id}/")]


def test_a_worker_that_meets_corrupt_teacher_logits_stops_the_run_instead_of_recording_an_invalid_row(
        grid_report, tmp_path, capsys):
    """Logits that pass the driver's check (their manifest forged to match) but are no tensor: the worker's
    CorruptArtifactError is the store's fault, not the candidate's."""
    folder, store, run_id = copied(grid_report, tmp_path)
    [logits] = folder.glob("teachers/*/logits/train.pt")
    logits.write_bytes(b"garbage, not a torch file")
    (logits.parent / "manifest.json").unlink()
    store.write_manifest(str(logits.parent.relative_to(folder)))
    code, _, err = cli(["run", str(GRID), "--store", str(folder), "--no-progress",
                        "--set", "search.candidates=[{scale: 0.75}]"], capsys)  # a new candidate: a worker trains it
    assert code == 2 and one_line_naming(err, str(logits.relative_to(folder))), err
    assert not [k for k in new_keys(store, run_id) if "/evals/" in k]


def test_logits_that_match_a_forged_manifest_but_are_no_tensor_are_a_corrupt_artifact(tmp_path):
    """What a worker reads: refused naming the file (the pool stops the run on it, not an invalid row)."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("teachers/0123456789abcdef/logits/train.pt", b"garbage, not a torch file")
    store.write_manifest("teachers/0123456789abcdef/logits")
    with pytest.raises(CorruptArtifactError, match="teachers/0123456789abcdef/logits/train.pt is corrupt"):
        load_train_logits(store, "0123456789abcdef")
