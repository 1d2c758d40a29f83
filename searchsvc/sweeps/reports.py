"""Trial reports become rows of the run: a report that carries a `spec` is one row (an epoch-only report just
feeds ASHA), through the results callback Tune calls as trials report, also after a restore."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from ray import tune

from searchsvc.rewards import RewardForm
from searchsvc.running.job import RunContext
from searchsvc.running.recorder import Recorder
from storage import StoreUnreachableError, layout, spool
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics, stored_metrics
from workers.measurement.run_measures import is_run_column

log = logging.getLogger(__name__)


class TrialRecorder(Recorder):
    """Rows from trial reports: a report with a `spec` is one row, with the trial and its `row` extras.

    A report that arrives while the store is down cannot become a row (its metrics are read from the store),
    and Tune will not send it again: it is kept in the local spool (`runs/<id>/reports/`), uploaded by
    `resume`, and recorded then."""

    def __init__(self, context: RunContext, reward_form: RewardForm = "c_2_minus_c", total: int | None = None) -> None:
        super().__init__(context, reward_form, total)
        if context.resumed:
            for key in context.store.list(layout.reports_prefix(context.run_id)):
                kept = context.store.get_mapping(key)
                self.record_report(str(kept["trial"]), dict(kept["sample"]), dict(kept["result"]))

    def record_report(self, trial_id: str, sample: dict[str, Any], result: dict[str, Any]) -> None:
        if "spec" not in result:
            return
        try:
            self._record_report(trial_id, sample, result)
        except StoreUnreachableError as err:
            kept = {"trial": trial_id, "sample": sample,
                    "result": {k: v for k, v in result.items() if k in REPORT_KEYS or k.startswith(ROW)}}
            key = layout.trial_report(self.context.run_id, trial_id, result["spec_hash"])
            spool.keep_bytes(self.context.store, key, json.dumps(kept, sort_keys=True, default=str).encode())
            raise self.store_down(err) from None

    def _record_report(self, trial_id: str, sample: dict[str, Any], result: dict[str, Any]) -> None:
        spec = CandidateSpec.from_json(result["spec"])
        metrics = stored_metrics(self.context.store, spec.spec_hash)  # the store is the truth
        if metrics is None:  # not stored (out of memory): what the trial said
            metrics = CandidateMetrics.invalid(spec.spec_hash, result["error"] or "not stored")
        extras = {key[len(ROW):]: value for key, value in result.items() if key.startswith(ROW)}
        # The run's own measurements the trial added and the stored metrics.json lacks (a budget's latency, int8
        # figures): the row and its budget verdict need them.
        added = {k: extras[k] for k in extras if is_run_column(k) and metrics.get(k) is None}
        if added and metrics.status == "ok":
            metrics = replace(metrics, extra={**metrics.extra, **added})
        self.record(spec, metrics, bool(result["cached"]), trial=trial_id, sample=json.dumps(sample, sort_keys=True),
                    **extras)


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
        self.recorder.record_report(trial.trial_id, trial.config, result)


def restored_tuner(path: str, trainable: Any, filesystem: Any, recorder: TrialRecorder) -> tune.Tuner:
    """The run's Tuner restored from the store, its results callback recording through `recorder`."""
    token = _RESTORING.set(recorder)
    try:
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    finally:
        _RESTORING.reset(token)


REPORT_KEYS = ("spec", "spec_hash", "cached", "status", "error")  # what a report's row is made of, with ROW keys

# Report keys with this prefix become columns of the candidate's row (the prefix dropped). Reports stay flat:
# numbers and strings, a mapping or list as its JSON text (a Parquet column holds it as such).
ROW = "row_"


def report_fields(spec: CandidateSpec, metrics: CandidateMetrics, cached: bool, **row: Any) -> dict[str, Any]:
    """The keys of a report that becomes a row: the spec, whether it was cached, its status, `row` extras."""
    flat = {ROW + key: json.dumps(value, sort_keys=True) if isinstance(value, (dict, list, tuple)) else value
            for key, value in row.items()}
    return {"spec_hash": spec.spec_hash, "spec": spec.canonical_json(), "cached": cached,
            "status": metrics.status, "error": metrics.error or "", **flat}
