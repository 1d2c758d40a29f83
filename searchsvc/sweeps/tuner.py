"""What every Ray Tune method shares: the sweep's search space, the Tuner on the run's store, and the
recorder that turns trial reports into result rows.

A method supplies a trial function `trial(sample, job)` that evaluates candidates inside the trial
(worker_context + evaluate_candidate) and reports with `report_fields`; a report that carries a
`spec` becomes a row of the run (an epoch-only report just feeds ASHA). Methods whose trial is one
candidate (agp, rigl) use `candidate_trial` and `run_sparse_sweep` whole. Tune's experiment lives in
runs/<id>/state/tune on the run's own store, so `searchsvc resume` restores it from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from core.errors import SearchsvcError, first_line
from searchsvc.reporting.table import pareto_front
from searchsvc.rewards import RewardForm
from searchsvc.running.job import RunContext
from searchsvc.running.recorder import Recorder
from searchsvc.sweeps.schema import LogRange, SweepTune
from storage import ArtifactStore, CorruptArtifactError, StoreUnreachableError, layout, spool
from workers.data.datasets import DatasetConfig
from workers.evaluation.evaluate import UnsavedResult, evaluate_candidate
from workers.evaluation.pool import ray_resources
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics, stored_metrics
from workers.measurement.run_measures import is_run_column
from workers.training.train import Checkpointer, TrainCallback

log = logging.getLogger(__name__)
EXPERIMENT = layout.TUNE_EXPERIMENT  # Tune's experiment folder name under runs/<id>/state/
# A config's metric → the report key ASHA compares: "accuracy" is validation accuracy (test only reports).
TUNE_METRICS = {"reward": "reward", "accuracy": "val_accuracy"}


def choose(values: tuple, default: Any) -> Any:
    """A list of choices as a Tune grid (one value: that value; none: the default)."""
    return default if not values else values[0] if len(values) == 1 else tune.grid_search(list(values))


def lr_space(sweep: SweepTune, default: float) -> Any:
    """lr as choices (a grid) or a log-uniform range."""
    lr = sweep.lr
    return tune.loguniform(lr.low, lr.high) if isinstance(lr, LogRange) else choose(lr, default)


def samples_per_point(sweep: SweepTune) -> int:
    """Tune's num_samples: lr draws per grid point when lr is a range; else 1 (a repeat would be identical)."""
    return sweep.num_samples if isinstance(sweep.lr, LogRange) else 1


def trial_count(sweep: SweepTune, *choice_lists: tuple) -> int:
    """Trials of the sweep: the grid's combinations (lr's choices included) times the samples per point."""
    lists = (*choice_lists, () if isinstance(sweep.lr, LogRange) else sweep.lr)
    return math.prod(max(1, len(v)) for v in lists) * samples_per_point(sweep)


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


class _ReportRows(tune.Callback):
    """Trial reports to the driver's recorder, as they arrive."""

    def __init__(self, recorder: TrialRecorder) -> None:
        self.recorder: TrialRecorder | None = recorder

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment's tuner.pkl on the store: the recorder (the store
        # client, every row, a progress bar) stays out of it. A resumed run attaches its own (`_attach`).
        return {**self.__dict__, "recorder": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if self.recorder is None:  # a bug: unpickled from tuner.pkl and never replaced; rows would be lost unseen
            raise RuntimeError("the results callback has no recorder: a restored Tuner needs sweep._attach")
        self.recorder.record_report(trial.trial_id, trial.config, result)


def _attach(tuner: tune.Tuner, recorder: TrialRecorder) -> tune.Tuner:
    """A restored Tuner with this driver's `_ReportRows` in place of the recorder-less one from tuner.pkl.

    Ray has no public API for a restored Tuner's run config (ray-project/ray#41364, open); the internal
    `Tuner._local_tuner.get_run_config()` is the known way. A Ray without it stops the resume here, rather
    than run the trials and record no rows."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None or not callable(getattr(local, "get_run_config", None)):
        raise SearchsvcError("cannot resume the Tune experiment: this Ray's Tuner has no _local_tuner.get_run_config() "
                             "to re-attach the results callback (ray-project/ray#41364); use the Ray version "
                             "searchsvc pins, and no Ray client (ray://) address")
    run_config = local.get_run_config()
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, _ReportRows)]
    run_config.callbacks = [*kept, _ReportRows(recorder)]
    return tuner


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


def experiment_path(store: ArtifactStore, run_id: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the run's Tune experiment: on the store itself, local or S3."""
    filesystem, base = store.arrow_filesystem()
    return filesystem, f"{base}/{layout.run_state(run_id, EXPERIMENT)}"


def build_tuner(context: RunContext, trial: Callable[..., None], job: Any, param_space: dict[str, Any],
                sweep: SweepTune, metric: str, time_attr: str, max_t: int, recorder: TrialRecorder) -> tune.Tuner:
    """A new Tuner (ASHA on `metric` per `time_attr`), or the run's own restored from the store when resuming;
    either way its trial reports become rows through `recorder`."""
    trainable = tune.with_parameters(tune.with_resources(trial, ray_resources(context.config.resources)), job=job)
    filesystem, path = experiment_path(context.store, context.run_id)
    if context.resumed and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log.info("restoring the Tune experiment of run %s", context.run_id)
        return _attach(tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                          storage_filesystem=filesystem), recorder)
    scheduler = ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=min(sweep.grace_period, max_t),
                              reduction_factor=sweep.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                    num_samples=samples_per_point(sweep),
                                    max_concurrent_trials=context.config.resources.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=context.config.seed)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
                                  storage_filesystem=filesystem, verbose=0,
                                  # Every checkpoint is kept (Tune's default): with the store down, the
                                  # experiment state a resume restores can be older than the newest
                                  # checkpoints, and must still find the one it names.
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  callbacks=[_ReportRows(recorder)]),
    )


def fit(context: RunContext, tuner: tune.Tuner, recorder: TrialRecorder) -> tune.ResultGrid:
    """Run the sweep (its callback records rows as trials report); SearchsvcError if every trial failed, and
    the store's StoreUnreachableError (with how to resume) if the store stayed down for trials or driver."""
    try:
        with _one_line_logs():
            grid = tuner.fit()
    except Exception as err:  # noqa: BLE001 — the store's error, however Tune wraps it; anything else as it is
        down = _store_error(err)
        if down is None:
            raise
        raise recorder.store_down(down) from None
    down = next((found for err in grid.errors if (found := _store_error(err)) is not None), None)
    if down is not None:  # trials failed because the store stayed down: resume continues them
        raise recorder.store_down(down)
    failed = [str(err).splitlines()[0][:300] for err in grid.errors]
    if failed and len(failed) == len(grid):
        recorder.close()
        raise SearchsvcError(f"every Tune trial failed; first error: {failed[0]}")
    for err in failed:
        log.warning("a Tune trial failed: %s", err)
    context.summary.update(failed_trials=len(failed))
    return grid


# Tune logs a failed trial, and each failed save or load of its experiment state on the store, with a traceback
# (a store outage gives dozens). The run's own one-line error says what happened: these loggers' lines stay
# one line each while the sweep runs; a trial's traceback is in its error.txt of the experiment (and on
# stderr with --debug).
QUIET_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.execution.experiment_state",
                 "ray.tune.logger.logger", "ray.train._internal.storage", "ray.train._internal.syncer")
TRACEBACK = "Traceback (most recent call last):"


class _NoTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info or TRACEBACK in message:
            cause = first_line(record.exc_info[1]) if record.exc_info and record.exc_info[1] else \
                message.rstrip().splitlines()[-1]
            record.msg = f"{message.split(TRACEBACK)[0].strip()} {cause}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


@contextlib.contextmanager
def _one_line_logs() -> Iterator[None]:
    loggers = [] if logging.getLogger().isEnabledFor(logging.DEBUG) else [logging.getLogger(n) for n in QUIET_LOGGERS]
    only_line = _NoTraceback()
    for logger in loggers:
        logger.addFilter(only_line)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(only_line)


def _store_error(err: BaseException) -> StoreUnreachableError | None:
    """The StoreUnreachableError behind a Tune error (a trial's travels back as text), or None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, StoreUnreachableError):
            return seen
        seen = seen.__cause__ or seen.__context__
    marker = f"{StoreUnreachableError.__name__}: "
    line = next((line for line in str(err).splitlines() if marker in line), None)
    return StoreUnreachableError(line.split(marker, 1)[1]) if line else None


def evaluate_or_keep(spec: CandidateSpec, ctx: Any, callbacks: Sequence[TrainCallback] = ()) -> CandidateMetrics:
    """`evaluate_candidate` in a trial. A result the store could not take (it stayed down) is kept on this
    machine's disk, which `searchsvc resume` uploads, and the trial fails with the store's error."""
    try:
        return evaluate_candidate(spec, ctx, callbacks=callbacks)
    except UnsavedResult as err:
        for key, data in err.files.items():
            spool.keep_bytes(ctx.store, key, data)
        raise StoreUnreachableError(str(err)) from None


def absolute_dataset(dataset: DatasetConfig) -> DatasetConfig:
    """Tune runs trials in their own working folder: a relative dataset root must not move with them."""
    return replace(dataset, root=str(Path(dataset.root).resolve())) if dataset.root else dataset


def mark_pareto(rows: list[dict[str, Any]], size: str = "params") -> set[str]:
    """Set each row's `pareto` column (accuracy vs `size`); return the front's spec hashes."""
    front = pareto_front(rows, size)
    for row in rows:
        row["pareto"] = row["spec_hash"] in front
    return front


class TrialCheckpoints(Checkpointer):
    """A Tune trial's epoch checkpoints, on the run's store. After each epoch but the last, validation accuracy
    (ASHA's signal; and the record's `extra` keys) is reported with the training state; the trial's final
    report, with the stored candidate, is its own (ASHA stops a trial that reaches max_t). A restarted trial
    (its worker lost, or the driver killed and the run resumed) loads the latest state, checked against the
    sha256 written beside it, and continues from that epoch."""

    FILE = "train_state.pt"

    def __init__(self, *extra: str, spec_hash: str = "", files: dict[str, str] | None = None,
                 fixed: dict[str, Any] | None = None) -> None:
        """`extra`: record keys each report carries; `spec_hash`: the candidate being trained (a checkpoint of
        another one is not loaded); `files`: text files saved beside the state (a Taylor trial's own state.json,
        so a restore knows its iteration); `fixed`: keys every epoch report carries (Tune wants its metric in
        each: a Taylor trial's reward so far). train_model saves after every epoch but the last."""
        self.extra, self.spec_hash = extra, spec_hash
        self.files, self.fixed = files or {}, fixed or {}

    def load(self) -> dict[str, Any] | None:
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            path = Path(folder) / self.FILE
            if not path.exists():
                return None
            raw, digest = path.read_bytes(), Path(folder) / f"{self.FILE}.sha256"
            if not digest.exists() or hashlib.sha256(raw).hexdigest() != digest.read_text().strip():
                raise CorruptArtifactError(f"trial checkpoint {checkpoint.path}/{self.FILE} is corrupt "
                                           "(its sha256 does not match)")
            state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        return state if state.get("spec_hash") == self.spec_hash else None  # an earlier candidate's epochs

    def save(self, state: dict[str, Any], record: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "spec_hash": self.spec_hash}, buffer)
        with tempfile.TemporaryDirectory() as folder:
            for name, text in self.files.items():
                (Path(folder) / name).write_text(text)
            (Path(folder) / self.FILE).write_bytes(buffer.getvalue())
            (Path(folder) / f"{self.FILE}.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
            tune.report({**self.fixed, "epoch": state["epoch"], "val_accuracy": record["val_accuracy"],
                         **{k: record.get(k, 0.0) for k in self.extra}},
                        checkpoint=tune.Checkpoint.from_directory(folder))
