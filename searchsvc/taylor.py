"""`method: taylor` — iterative Taylor filter pruning, one Ray Tune trial per hyper-parameter sample.

    search:
      iterations: 5                  # prune / fine-tune rounds per trial
      filters_per_iteration: 0.1     # a fraction of the teacher's channels, or a count
      stop: {max_drop: 2.0}          # end a trial 2 points below the teacher
      tune: {filters_per_iteration: [0.05, 0.1], lr: {low: 0.005, high: 0.05}, num_samples: 2}  # 2 x 2 trials

A trial's iteration i prunes the model of iteration i-1 (the teacher for i = 1) by Taylor importance
(workers/taylor.py), fine-tunes it, and measures it: a candidate in the store whose `init` is its
parent, reported to Tune as one step. The trial ends after `iterations`, at the stop rule, or when
ASHA stops it. A checkpoint is only (iteration, parent hash); the models are in the store, so a
restarted or restored trial continues where it was. Tune's experiment lives in runs/<id>/state/tune.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from searchsvc.evaluator import Recorder, ensure_ray, prepare_teacher_logits
from searchsvc.job import RunContext
from searchsvc.methods import LogRange, TaylorSearch, TaylorStop
from searchsvc.plots import trajectory_png
from searchsvc.rewards import INVALID_REWARD, reward
from storage import ArtifactStore, SearchsvcError
from storage.tables import pareto_front, run_prefix
from workers.data import DatasetConfig
from workers.evaluate import evaluate_candidate, invalid_metrics, stored_metrics
from workers.measure import count_parameters
from workers.pool import ray_resources, worker_context
from workers.resources import Resources
from workers.spec import CandidateSpec
from workers.taylor import prunable_channels
from workers.train import DistillConfig, TrainConfig

log = logging.getLogger(__name__)
EXPERIMENT = "tune"  # Tune's experiment folder name under runs/<id>/state/


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs from the driver (sent once, through tune.with_parameters)."""

    store: ArtifactStore
    arch: str
    teacher_hash: str
    teacher_accuracy: float
    teacher_params: int
    teacher_channels: int  # prunable channels of the teacher: what a fractional step is a share of
    dataset: DatasetConfig
    train: TrainConfig
    search: TaylorSearch
    resources: Resources
    seed: int


def param_space(search: TaylorSearch, train: TrainConfig) -> dict[str, Any]:
    """Tune's param_space: every combination of the choice lists (a grid: no two trials alike), the lr
    range sampled log-uniformly, other keys fixed at the config's value."""
    def choose(values: tuple, default: Any) -> Any:
        return default if not values else values[0] if len(values) == 1 else tune.grid_search(list(values))

    lr = search.tune.lr
    return {
        "filters_per_iteration": choose(search.tune.filters_per_iteration, search.filters_per_iteration),
        "lr": tune.loguniform(lr.low, lr.high) if isinstance(lr, LogRange) else choose(lr, train.lr),
        "epochs": choose(search.tune.epochs, train.epochs),
        "distill": choose(search.tune.distill, train.distill.alpha > 0),
    }


def samples_per_point(search: TaylorSearch) -> int:
    """Tune's num_samples: lr draws per grid point when lr is a range; else 1 (a repeat would be identical)."""
    return search.tune.num_samples if isinstance(search.tune.lr, LogRange) else 1


def trial_count(search: TaylorSearch) -> int:
    """Trials of the sweep: the grid's combinations times the samples per grid point."""
    lists = (search.tune.filters_per_iteration, search.tune.epochs, search.tune.distill,
             () if isinstance(search.tune.lr, LogRange) else search.tune.lr)
    return math.prod(max(1, len(v)) for v in lists) * samples_per_point(search)


def prune_count(filters_per_iteration: int | float, teacher_channels: int) -> int:
    """Channels removed per iteration: a count as given, a fraction of the teacher's channels rounded."""
    if isinstance(filters_per_iteration, float):
        return max(1, round(filters_per_iteration * teacher_channels))
    return int(filters_per_iteration)


def iteration_spec(job: TrialJob, sample: dict[str, Any], parent: str | None) -> CandidateSpec:
    """The candidate of one iteration: prune `parent` (None: the teacher), fine-tune with the sample's recipe."""
    alpha = (job.train.distill.alpha or DistillConfig().alpha) if sample["distill"] else 0.0
    train = replace(job.train, lr=float(sample["lr"]), epochs=int(sample["epochs"]),
                    distill=replace(job.train.distill, alpha=alpha))
    count = prune_count(sample["filters_per_iteration"], job.teacher_channels)
    return CandidateSpec(arch=job.arch, teacher=job.teacher_hash, dataset=job.dataset, train=train,
                         method="taylor", init=parent, seed=job.seed,
                         params=(("importance_batches", job.search.importance_batches), ("prune", count)))


def stop_reason(accuracy: float, start: float, stop: TaylorStop) -> str | None:
    """Why a trial must end at this accuracy (the seed's rule), or None to go on. Accuracies in 0..1."""
    if stop.min_accuracy is not None and accuracy < stop.min_accuracy:
        return f"accuracy {accuracy:.4f} below min_accuracy {stop.min_accuracy}"
    if (start - accuracy) * 100 > stop.max_drop:
        return f"accuracy {accuracy:.4f} more than {stop.max_drop} points below the start ({start:.4f})"
    return None


def taylor_trial(sample: dict[str, Any], job: TrialJob) -> None:
    """One Tune trial: iterate prune → fine-tune → measure, reporting each iteration."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per iteration
    ctx = worker_context(job.store, job.teacher_hash, job.dataset, job.resources)
    state: dict[str, Any] = {"iteration": 0, "parent": None}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / "state.json").read_text())
    for iteration in range(state["iteration"] + 1, job.search.iterations + 1):
        spec = iteration_spec(job, sample, state["parent"])
        metrics = stored_metrics(job.store, spec.spec_hash)
        cached = metrics is not None
        if metrics is None:
            metrics = evaluate_candidate(spec, ctx)
        ok = metrics["status"] == "ok"
        reason = stop_reason(metrics["accuracy"], job.teacher_accuracy, job.search.stop) if ok else \
            f"invalid: {metrics.get('error')}"
        score = reward(metrics["params"], metrics["accuracy"], job.teacher_params, job.teacher_accuracy,
                       job.search.reward) if ok else INVALID_REWARD
        state = {"iteration": iteration, "parent": spec.spec_hash}
        report = {"iteration": iteration, "spec_hash": spec.spec_hash, "spec": spec.canonical_json(),
                  "cached": cached, "status": metrics["status"], "error": metrics.get("error") or "",
                  "accuracy": metrics["accuracy"], "params": metrics.get("params") or 0, "reward": score,
                  "stop_reason": reason or ""}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps(state))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
        if reason:
            return


# The driver's recorder of each run, found by run id: Tune pickles its callbacks into the experiment
# state, so the callback carries only the id and finds the live recorder (also after a restore).
_RECORDERS: dict[str, "TrialRecorder"] = {}


class TrialRecorder(Recorder):
    """Rows from trial reports: one per iteration, with the trial and iteration beside the metrics."""

    def record_report(self, trial_id: str, sample: dict[str, Any], result: dict[str, Any]) -> None:
        spec = CandidateSpec.from_json(result["spec"])
        metrics = stored_metrics(self.ctx.store, spec.spec_hash)  # the store is the truth
        if metrics is None:  # not stored (out of memory): what the trial said
            metrics = invalid_metrics(spec.spec_hash, result["error"] or "not stored")
        self.record(spec, metrics, bool(result["cached"]), trial=trial_id, iteration=int(result["iteration"]),
                    filters=metrics.get("filters"), stop_reason=result["stop_reason"] or None,
                    sample=json.dumps(sample, sort_keys=True))


class _ReportRows(tune.Callback):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        recorder = _RECORDERS.get(self.run_id)
        if recorder is not None:
            recorder.record_report(trial.trial_id, trial.config, result)


def experiment_path(store: ArtifactStore, run_id: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the run's Tune experiment: on the store itself, local or S3."""
    filesystem, base = store.arrow_filesystem()
    return filesystem, f"{base}/{run_prefix(run_id)}/state/{EXPERIMENT}"


def build_tuner(context: RunContext, job: TrialJob) -> tune.Tuner:
    """A new Tuner, or the run's own restored from the store when resuming."""
    search: TaylorSearch = context.config.search
    trainable = tune.with_parameters(tune.with_resources(taylor_trial, ray_resources(context.config.resources)),
                                     job=job)
    filesystem, path = experiment_path(context.store, context.run_id)
    if context.resumed and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log.info("restoring the Tune experiment of run %s", context.run_id)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    scheduler = ASHAScheduler(time_attr="iteration", max_t=search.iterations,
                              grace_period=min(search.tune.grace_period, search.iterations),
                              reduction_factor=search.tune.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space=param_space(search, context.config.train),
        tune_config=tune.TuneConfig(metric=search.tune.metric, mode="max", scheduler=scheduler,
                                    num_samples=samples_per_point(search),
                                    max_concurrent_trials=context.config.resources.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=context.config.seed)),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path.rsplit("/", 1)[0],
                                  storage_filesystem=filesystem, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=search.tune.max_failures),
                                  callbacks=[_ReportRows(context.run_id)]),
    )


def run_taylor(context: RunContext) -> None:
    """The taylor driver: a Tune sweep of pruning trajectories, recorded row by row into the run."""
    search: TaylorSearch = context.config.search
    ensure_ray(context.address)
    prepare_teacher_logits(context)
    teacher = context.teacher
    job = TrialJob(store=context.store, arch=context.config.teacher.arch, teacher_hash=teacher.teacher_hash,
                   teacher_accuracy=teacher.test_accuracy, teacher_params=count_parameters(teacher.model),
                   teacher_channels=prunable_channels(teacher.model.arch), dataset=_absolute(context.config.dataset),
                   train=context.config.train, search=search, resources=context.config.resources,
                   seed=context.config.seed)
    recorder = TrialRecorder(context, search.reward, total=trial_count(search) * search.iterations)
    _RECORDERS[context.run_id] = recorder
    try:
        grid = build_tuner(context, job).fit()
    finally:
        _RECORDERS.pop(context.run_id, None)
    failed = [str(err).splitlines()[0][:300] for err in grid.errors]
    if failed and len(failed) == len(grid):
        recorder.close()
        raise SearchsvcError(f"every Tune trial failed; first error: {failed[0]}")
    for err in failed:
        log.warning("a Tune trial failed: %s", err)
    finish(recorder, failed_trials=len(failed))


def finish(recorder: TrialRecorder, failed_trials: int = 0) -> None:
    """Mark the Pareto front, store the trajectory plot and a per-trial summary, write the table."""
    ctx = recorder.ctx
    rows = list(recorder.rows.values())
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["spec_hash"] in front
    prefix = run_prefix(ctx.run_id)
    png = trajectory_png(rows, recorder.teacher_params, recorder.teacher_accuracy,
                         title=f"Taylor pruning, run {ctx.run_id}")
    ctx.store.put_bytes(f"{prefix}/plots/trajectory.png", png)
    trials = trial_summaries(rows)
    ctx.store.put_json(f"{prefix}/trials.json", trials)
    recorder.close()
    ctx.summary.update(trials=len(trials), failed_trials=failed_trials, pareto=len(front),
                       plot=ctx.store.uri_for(f"{prefix}/plots/trajectory.png"))


def trial_summaries(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trial: its sample, iterations done, why it stopped, and its best model within the stop rule."""
    trials: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r["trial"], r["iteration"])):
        trial = trials.setdefault(row["trial"], {"sample": json.loads(row["sample"]), "iterations": 0,
                                                 "stop_reason": None, "best": None})
        trial["iterations"] = row["iteration"]
        trial["stop_reason"] = row["stop_reason"]
        if row["status"] == "ok" and row["stop_reason"] is None and (
                trial["best"] is None or row["reward"] > trial["best"]["reward"]):
            trial["best"] = {k: row[k] for k in ("spec_hash", "iteration", "accuracy", "params", "compression",
                                                 "reward", "artifact")}
    return trials


def _absolute(dataset: DatasetConfig) -> DatasetConfig:
    """Tune runs trials in their own working folder: a relative dataset root must not move with them."""
    return replace(dataset, root=str(Path(dataset.root).resolve())) if dataset.root else dataset
