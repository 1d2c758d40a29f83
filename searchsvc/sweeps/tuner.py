"""The Tuner of a Ray Tune method, on the run's own store: built (ASHA, a grid over the sweep's choices) or restored
when resuming, run with one-line logs, and the store's errors told apart from the trials' own.

A method supplies a trial function `trial(sample, job)` that evaluates candidates inside the trial
(`stored_or_kept`: stored, else evaluated, then completed) and reports with `reports.report_fields`; the
results callback (sweeps/reports.py) turns each report that carries a finished candidate (a `TrialReport`)
into a row of the run. Methods whose trial is one candidate (agp, rigl) use sweeps/sparse.py whole. Tune's
experiment lives in runs/<id>/state/tune on the run's own store, so `searchsvc resume` restores it from there.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from core.errors import SearchsvcError
from searchsvc.reporting.rows import ResultRow, pareto_front
from searchsvc.running.faults import ray_fault
from searchsvc.running.job import RunContext
from searchsvc.sweeps.logs import one_line_logs
from searchsvc.sweeps.reports import ReportRows, TrialRecorder, restored_tuner
from searchsvc.sweeps.schema import SweepTune
from searchsvc.sweeps.space import samples_per_point
from storage import ArtifactStore, StoreUnreachableError, layout, spool
from workers.data.datasets import DatasetConfig
from workers.evaluation.evaluate import UnsavedResult, stored_or_evaluated
from workers.evaluation.pool import ray_resources
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics
from workers.training.train import TrainCallback

log = logging.getLogger(__name__)
EXPERIMENT = layout.TUNE_EXPERIMENT  # Tune's experiment folder name under runs/<id>/state/
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
        return restored_tuner(path, trainable, filesystem, recorder)
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
                                  callbacks=[ReportRows(recorder)]),
    )


def fit(context: RunContext, tuner: tune.Tuner, recorder: TrialRecorder) -> tune.ResultGrid:
    """Run the sweep (its callback records rows as trials report); SearchsvcError if every trial failed, the
    store's StoreUnreachableError (with how to resume) if the store stayed down for trials or driver, and Ray's
    own error if it lost a trial's worker or node more than `max_failures` times (searchsvc/running/faults.py)."""
    try:
        with one_line_logs():
            grid = tuner.fit()
    except Exception as err:  # noqa: BLE001 — the store's error, however Tune wraps it; anything else as it is
        down = _store_error(err)
        if down is None:
            raise
        raise recorder.store_down(down) from None
    down = next((found for err in grid.errors if (found := _store_error(err)) is not None), None)
    if down is not None:  # trials failed because the store stayed down: resume continues them
        raise recorder.store_down(down)
    lost = next((err for err in grid.errors if ray_fault(err) is not None), None)
    if lost is not None:  # Ray lost a trial's worker or node past max_failures: the run fails (the job says so in
        recorder.close()  # one line), and resume restores the trial from its last checkpoint
        raise lost
    failed = [str(err).splitlines()[0][:300] for err in grid.errors]
    if failed and len(failed) == len(grid):
        recorder.close()
        raise SearchsvcError(f"every Tune trial failed; first error: {failed[0]}")
    for err in failed:
        log.warning("a Tune trial failed: %s", err)
    context.summary.update(failed_trials=len(failed))
    return grid


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


def stored_or_kept(spec: CandidateSpec, ctx: Any,
                   callbacks: Sequence[TrainCallback] = ()) -> tuple[CandidateMetrics, bool]:
    """`stored_or_evaluated` in a trial: (metrics, from the store). A result the store could not take (it stayed
    down) is kept on this machine's disk, which `searchsvc resume` uploads, and the trial fails with the store's
    error."""
    try:
        return stored_or_evaluated(spec, ctx, callbacks=callbacks)
    except UnsavedResult as err:
        for key, data in err.files.items():
            spool.keep_bytes(ctx.store, key, data)
        raise StoreUnreachableError(str(err)) from None


def absolute_dataset(dataset: DatasetConfig) -> DatasetConfig:
    """Tune runs trials in their own working folder: a relative dataset root must not move with them."""
    if not dataset.root or "://" in dataset.root:  # none, or on S3: nothing to resolve
        return dataset
    return replace(dataset, root=str(Path(dataset.root).resolve()))


def mark_pareto(rows: dict[str, ResultRow], size: str = "params") -> set[str]:
    """Set the `pareto` column (accuracy vs `size`) of each of a run's rows (spec_hash → row); return the
    front's spec hashes."""
    front = pareto_front(rows.values(), size)
    for spec_hash, row in rows.items():
        rows[spec_hash] = row.with_columns(pareto=spec_hash in front)
    return front
