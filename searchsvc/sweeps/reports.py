"""Trial reports become rows of the run: a report that carries a finished candidate (a `TrialReport`) is one
row (an epoch-only report just feeds ASHA), through the results callback Tune calls as trials report, also
after a restore."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ray import tune

from core.records import RecordError, from_data, to_data
from searchsvc.rewards import RewardForm
from searchsvc.running.job import RunContext
from searchsvc.running.recorder import Recorder
from storage import CorruptArtifactError, StoreUnreachableError, layout, spool
from storage.base import ArtifactStore
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics, stored_metrics
from workers.measurement.run_measures import is_run_column

log = logging.getLogger(__name__)


class TrialRecorder(Recorder):
    """Rows from trial reports: a report that carries a finished candidate is one row, with the trial, its sample
    and the report's own columns.

    A report that arrives while the store is down cannot become a row (its metrics are read from the store),
    and Tune will not send it again: it is kept in the local spool (`runs/<id>/reports/`), uploaded by
    `resume`, and recorded then."""

    def __init__(self, context: RunContext, reward_form: RewardForm = "c_2_minus_c", total: int | None = None) -> None:
        super().__init__(context, reward_form, total)
        if context.resumed:
            for key in context.store.list(layout.reports_prefix(context.run_id)):
                trial, sample, report = kept_report(context.store, key)
                self.record_report(trial, sample, report)

    def record_report(self, trial_id: str, sample: dict[str, Any], report: TrialReport) -> None:
        """The row of a trial's finished candidate (kept in the spool, and the run stopped, if the store is down)."""
        try:
            self._record_report(trial_id, sample, report)
        except StoreUnreachableError as err:
            kept = {"trial": trial_id, "sample": sample, "report": report.to_data()}
            key = layout.trial_report(self.context.run_id, trial_id, report.spec.spec_hash)
            spool.keep_bytes(self.context.store, key, json.dumps(kept, sort_keys=True, default=str).encode())
            raise self.store_down(err) from None

    def _record_report(self, trial_id: str, sample: dict[str, Any], report: TrialReport) -> None:
        spec = report.spec
        metrics = stored_metrics(self.context.store, spec.spec_hash)  # the store is the truth
        if metrics is None:  # not stored (out of memory): what the trial said
            metrics = CandidateMetrics.invalid(spec.spec_hash, report.error or "not stored")
        columns = dict(report.columns)
        # The run's own measurements the trial added and the stored metrics.json lacks (a budget's latency, int8
        # figures): the row and its budget verdict need them.
        added = {k: columns[k] for k in columns if is_run_column(k) and metrics.get(k) is None}
        if added and metrics.status == "ok":
            metrics = replace(metrics, extra={**metrics.extra, **added})
        self.record(spec, metrics, report.cached, trial=trial_id, sample=json.dumps(sample, sort_keys=True),
                    **columns)


def kept_report(store: ArtifactStore, key: str) -> tuple[str, dict[str, Any], TrialReport]:
    """(trial id, sample, report) of a report kept while the store was down; CorruptArtifactError naming it if
    it is not one."""
    kept = store.get_mapping(key)
    if not isinstance(kept.get("trial"), str) or not isinstance(kept.get("sample"), dict):
        raise CorruptArtifactError(f"{store.uri_for(key)} is corrupt: not a kept trial report (trial, sample)")
    return kept["trial"], kept["sample"], TrialReport.from_data(kept.get("report"), source=store.uri_for(key))


# The recorder of the driver restoring a Tuner: Tune unpickles the run's callbacks from its tuner.pkl inside
# `Tuner.restore`, and `ReportRows.__setstate__` takes this recorder there (`restored_tuner` sets it around the
# call). Ray has no public way to replace a restored Tuner's callbacks (ray-project/ray#41364); pickling's own
# hook needs none of its internals.
_RESTORING: ContextVar[TrialRecorder | None] = ContextVar("searchsvc_restoring_recorder", default=None)


class ReportRows(tune.Callback):
    """Trial reports to the driver's recorder, as they arrive."""

    def __init__(self, recorder: TrialRecorder) -> None:
        self.recorder: TrialRecorder | None = recorder

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment's tuner.pkl on the store: the recorder (the store
        # client, every row, a progress bar) stays out of it. A resumed run's own recorder comes back in
        # __setstate__, while `restored_tuner` restores.
        return {**self.__dict__, "recorder": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.recorder = _RESTORING.get()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if self.recorder is None:  # a bug: unpickled outside `restored_tuner`; rows would be lost unseen
            raise RuntimeError("the results callback has no recorder: restore a Tuner through sweeps.tuner")
        if CANDIDATE in result:  # else an epoch's report, for ASHA only
            report = TrialReport.from_data(result[CANDIDATE], source=f"trial {trial.trial_id}'s report")
            self.recorder.record_report(trial.trial_id, trial.config, report)


def restored_tuner(path: str, trainable: Any, filesystem: Any, recorder: TrialRecorder) -> tune.Tuner:
    """The run's Tuner restored from the store, its results callback recording through `recorder`."""
    token = _RESTORING.set(recorder)
    try:
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    finally:
        _RESTORING.reset(token)


CANDIDATE = "candidate"  # the key of a trial report that carries a finished candidate (TrialReport.to_data)


@dataclass(frozen=True)
class TrialReport:
    """A trial's finished candidate, as its report carries it to the driver: the row the driver records."""

    spec: CandidateSpec
    cached: bool  # found in the store, not trained by the trial
    status: Literal["ok", "invalid"]
    error: str | None  # why it is invalid (what the row says if the store has no metrics of it)
    # The row's own columns: numbers, strings, bools or null (a mapping or list as its JSON text: a column).
    columns: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict[str, Any]:
        """Plain data, as Tune carries and logs a report (result.json) and the spool keeps it."""
        return to_data(self)

    @classmethod
    def from_data(cls, data: Any, source: str) -> TrialReport:
        """The report back from plain data; CorruptArtifactError naming `source` if it is not one."""
        try:
            return from_data(cls, data, source=source)
        except RecordError as err:
            raise CorruptArtifactError(f"{source} is corrupt: not a trial report ({err.problems[0]})") from None


def report_fields(spec: CandidateSpec, metrics: CandidateMetrics, cached: bool, **columns: Any) -> dict[str, Any]:
    """The key of a trial's report that makes it a row: the candidate, whether it was cached, its status, and
    the row's own `columns`."""
    flat = {key: json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value
            for key, value in columns.items()}
    report = TrialReport(spec=spec, cached=cached, status=metrics.status, error=metrics.error, columns=flat)
    return {CANDIDATE: report.to_data()}
