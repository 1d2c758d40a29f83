"""Result rows stay typed from the recorder to Parquet and back (searchsvc.reporting.rows), and a Tune trial hands
its finished candidate to the driver as a typed report, not as JSON text inside its result."""

from __future__ import annotations

import json
import math

import pytest

from searchsvc.reporting.rows import ResultRow, read_row, stored_rows
from searchsvc.reporting.table import read_results, table_rows, write_results
from searchsvc.sweeps.reports import CANDIDATE, TrialReport, kept_report, report_fields
from storage import CorruptArtifactError, LocalStore
from workers.data.datasets import DatasetConfig
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics
from workers.training.train import TrainConfig


def test_a_row_round_trips_through_its_json_and_the_parquet_table(tmp_path, make_row):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("runs/r/config.yaml", b"method: taylor\n")
    rows = [make_row(spec_hash=f"h{i}", run_id="r", accuracy=0.5 + i / 10, val_accuracy=0.4 + i / 10, params=100 - i,
                     reward=i / 10, order=i + 1, trial="t1", iteration=i + 1, phase="prune") for i in range(3)]
    for row in rows:
        store.put_json(f"runs/r/evals/{row.spec_hash}.json", row.to_data(), write_once=True)
    assert stored_rows(store, "r") == rows  # typed, the run's own columns in `extra`, in the order recorded
    assert rows[0].get("phase") == "prune" and rows[0].get("missing", 7) == 7 and rows[0].order == 1
    assert rows[0].with_columns(order="2").order == 0  # an edited order is no traceback
    write_results(store, "r", rows)
    back = table_rows(read_results(store, "r"))
    assert [r.spec_hash for r in back] == ["h2", "h1", "h0"]  # ranked by reward
    assert back[-1] == rows[0]  # every column, fixed and the run's own, as recorded


@pytest.mark.parametrize(("edit", "problem"), [
    ({"accuracy": "high"}, "accuracy: must be a number"),
    ({"val_accuracy": math.nan}, "val_accuracy: must be a finite number"),
    ({"status": "great"}, "status: must be one of ok, invalid"),
    ({"params": 1.5}, "params: must be"),
    ({"reward": None}, "reward: must be a number"),
])
def test_an_edited_stored_row_is_named_corrupt_with_its_column(tmp_path, make_row, edit, problem):
    store = LocalStore(tmp_path / "store")
    row = make_row(spec_hash="a", order=1).to_data()
    store.put_bytes("runs/r/evals/a.json", json.dumps({**row, **edit}).encode())
    with pytest.raises(CorruptArtifactError) as err:
        read_row(store, "runs/r/evals/a.json")
    assert "runs/r/evals/a.json is corrupt" in str(err.value) and problem in str(err.value)


def test_a_row_without_a_required_column_is_refused_and_one_without_a_later_optional_one_is_read(make_row):
    data = make_row(spec_hash="a").to_data()
    with pytest.raises(CorruptArtifactError, match="wall_s: missing required key"):
        ResultRow.from_data({k: v for k, v in data.items() if k != "wall_s"}, source="x")
    older = ResultRow.from_data({k: v for k, v in data.items() if k not in ("within_budget", "model_bytes")}, "x")
    assert older.within_budget is None and older.model_bytes is None and older.extra == {}


def _spec() -> CandidateSpec:
    return CandidateSpec(arch="resnet20", teacher="0123456789abcdef", dataset=DatasetConfig(name="synthetic"),
                         train=TrainConfig(), method="taylor", init="fedcba9876543210",
                         params=(("importance_batches", 2), ("prune", 8)))


def test_a_trial_report_carries_the_candidate_as_data_and_comes_back_typed():
    spec = _spec()
    metrics = CandidateMetrics.invalid(spec.spec_hash, "out of memory")
    report = report_fields(spec, metrics, False, iteration=2, filters={"conv1": 8}, stop_reason=None)[CANDIDATE]
    assert isinstance(report["spec"], dict)  # the spec itself, not its JSON text inside the report
    back = TrialReport.from_data(json.loads(json.dumps(report)), source="trial t's report")  # as Tune logs it
    assert back.spec == spec and back.spec.spec_hash == spec.spec_hash
    assert back.status == "invalid" and back.error == "out of memory" and back.cached is False
    assert back.columns == {"iteration": 2, "filters": '{"conv1": 8}', "stop_reason": None}  # a column: JSON text
    with pytest.raises(CorruptArtifactError, match="trial t's report is corrupt: not a trial report"):
        TrialReport.from_data({**report, "cached": "yes"}, source="trial t's report")


def test_a_kept_trial_report_is_checked_before_it_is_recorded(tmp_path):
    store = LocalStore(tmp_path / "store")
    report = report_fields(_spec(), CandidateMetrics.invalid("x", "e"), True)[CANDIDATE]
    store.put_json("runs/r/reports/t-x.json", {"trial": "t", "sample": {"lr": 0.1}, "report": report})
    trial, sample, back = kept_report(store, "runs/r/reports/t-x.json")
    assert (trial, sample, back.cached, back.spec) == ("t", {"lr": 0.1}, True, _spec())
    store.put_json("runs/r/reports/t-y.json", {"trial": "t", "sample": {}, "report": {**report, "spec": "{}"}})
    with pytest.raises(CorruptArtifactError, match="t-y.json is corrupt"):
        kept_report(store, "runs/r/reports/t-y.json")
