"""`method: taylor` — iterative Taylor filter pruning, one Ray Tune trial per hyper-parameter sample.

    search:
      iterations: 5                  # prune / fine-tune rounds per trial
      filters_per_iteration: 0.1     # a fraction of the teacher's channels, or a count
      stop: {max_drop: 2.0}          # end a trial 2 points below the teacher (validation accuracy)
      tune: {filters_per_iteration: [0.05, 0.1], lr: {low: 0.005, high: 0.05}, num_samples: 2}  # 2 x 2 trials

A trial's iteration i prunes the model of iteration i-1 (the teacher for i = 1) by Taylor importance
(workers/compression/taylor.py), fine-tunes it, and measures it: a candidate in the store whose `init` is its
parent, reported to Tune as one step. The trial ends after `iterations`, at the stop rule, or when
ASHA stops it. With a MACs or parameter limit in `search.budget`, every step goes toward it: at least its share of
what is left of the way (the trial's last iteration reaches it), and where its channel count would pass the limit,
only as far as the fewest ranked channels within it, so the last pruned model sits just under the limit
(workers/compression/taylor.py). The first point within budget ends the pruning: the trial's remaining iterations
fine-tune it (rows of phase `fine-tune`, same architecture). A checkpoint is
(iteration, parent hash), plus the training state after each epoch of the iteration's fine-tune; the models
are in the store, so a restarted or restored trial continues where it was, mid-fine-tune included. Tune's
experiment lives in runs/<id>/state/tune.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import tune

from searchsvc.budget import measures_of
from searchsvc.methods.taylor import TaylorSearch, TaylorStop
from searchsvc.reporting.plots import trajectory_png
from searchsvc.reporting.rows import ResultRow
from searchsvc.rewards import INVALID_REWARD, reward
from searchsvc.running.job import RunContext
from searchsvc.running.ray_start import ensure_ray
from searchsvc.running.recorder import prepare_teacher_logits
from searchsvc.sweeps import space
from searchsvc.sweeps.checkpoints import TrialCheckpoints
from searchsvc.sweeps.reports import TrialRecorder, report_fields
from searchsvc.sweeps.space import TUNE_METRICS, choose, lr_space
from searchsvc.sweeps.tuner import absolute_dataset, build_tuner, fit, mark_pareto, stored_or_kept
from storage import ArtifactStore, layout
from workers.compression.taylor import prunable_channels
from workers.data.datasets import DatasetConfig
from workers.evaluation.pool import worker_context
from workers.evaluation.resources import Resources
from workers.evaluation.spec import Builder, CandidateSpec
from workers.measurement.measure import count_parameters
from workers.measurement.run_measures import Measures, run_columns
from workers.training.train import DistillConfig, TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrialJob:
    """What every trial needs from the driver (sent once, through tune.with_parameters)."""

    store: ArtifactStore
    arch: str
    teacher_hash: str
    teacher_val_accuracy: float  # the stop rule and the reward compare validation accuracies
    teacher_params: int
    teacher_channels: int  # prunable channels of the teacher: what a fractional step is a share of
    dataset: DatasetConfig
    train: TrainConfig
    search: TaylorSearch
    resources: Resources
    seed: int
    measures: Measures = Measures()  # the run's own measurements of each candidate (workers.measurement.run_measures)
    builder: Builder | None = None  # taylor's own candidate builder (its registry entry's)


def param_space(search: TaylorSearch, train: TrainConfig) -> dict[str, Any]:
    """Tune's param_space: every combination of the choice lists (a grid: no two trials alike), the lr
    range sampled log-uniformly, other keys fixed at the config's value."""
    return {
        "filters_per_iteration": choose(search.tune.filters_per_iteration, search.filters_per_iteration),
        "lr": lr_space(search.tune, train.lr),
        "epochs": choose(search.tune.epochs, train.epochs),
        "distill": choose(search.tune.distill, train.distill.alpha > 0),
    }


def trial_count(search: TaylorSearch) -> int:
    """Trials of the sweep: the grid's combinations times the samples per grid point."""
    return space.trial_count(search.tune, search.tune.filters_per_iteration, search.tune.epochs, search.tune.distill)


def prune_count(filters_per_iteration: float, teacher_channels: int) -> int:
    """Channels removed per iteration: a count as given, a fraction of the teacher's channels rounded."""
    if isinstance(filters_per_iteration, float):
        return max(1, round(filters_per_iteration * teacher_channels))
    return int(filters_per_iteration)


def iteration_spec(job: TrialJob, sample: dict[str, Any], parent: str | None, prune: bool = True,
                   steps_left: int = 1) -> CandidateSpec:
    """The candidate of one iteration: prune `parent` (None: the teacher), fine-tune with the sample's recipe.
    `prune=False`: fine-tune `parent` as it is (a trajectory that has met the budget). `steps_left`: iterations
    left to the trial, this one included (a budgeted step goes at least its share of the way)."""
    alpha = (job.train.distill.alpha or DistillConfig().alpha) if sample["distill"] else 0.0
    train = replace(job.train, lr=float(sample["lr"]), epochs=int(sample["epochs"]),
                    distill=replace(job.train.distill, alpha=alpha))
    count = prune_count(sample["filters_per_iteration"], job.teacher_channels) if prune else 0
    return CandidateSpec(arch=job.arch, teacher=job.teacher_hash, dataset=job.dataset, train=train,
                         method="taylor", init=parent, seed=job.seed,
                         params=step_params(job.search, count, steps_left, job.measures))


def step_params(search: TaylorSearch, count: int, steps_left: int = 1, measures: Measures = Measures()
                ) -> tuple[tuple[str, int | float | str], ...]:
    """What a pruning step needs beyond its parent: its channel count and ranking, and with a budget the cost it
    ranks by (workers.compression.costs) and, when that cost is itself limited, the limit it goes toward with
    `steps_left` steps to go (each at least its share of the way, the last reaching it)."""
    params: list[tuple[str, int | float | str]] = [
        ("importance_batches", search.importance_batches), ("prune", count), ("normalizer", search.normalizer),
        ("round_to", search.round_to)]
    if search.max_ratio < 1:  # absent at 1, as in every spec stored before the floor existed
        params.append(("max_ratio", search.max_ratio))
    if search.budget is not None and count:
        quantize = measures.quantize
        cost, limit = search.budget.cost(quantize.threads if quantize is not None else 1)
        params += [("cost", cost), ("cost_power", search.cost_power)]
        if limit is not None:
            params += [("limit", limit), ("steps_left", steps_left)]
    return tuple(params)


def stop_reason(accuracy: float, start: float, stop: TaylorStop) -> str | None:
    """Why a trial must end at this validation accuracy (the seed's rule), or None to go on. 0..1."""
    if stop.min_accuracy is not None and accuracy < stop.min_accuracy:
        return f"validation accuracy {accuracy:.4f} below min_accuracy {stop.min_accuracy}"
    if (start - accuracy) * 100 > stop.max_drop:
        return f"validation accuracy {accuracy:.4f} more than {stop.max_drop} points below the teacher's ({start:.4f})"
    return None


def taylor_trial(sample: dict[str, Any], job: TrialJob) -> None:
    """One Tune trial: iterate prune → fine-tune → measure, reporting each iteration."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one "checkpoint created" line per iteration
    ctx = worker_context(job.store, job.teacher_hash, job.dataset, job.resources, job.measures, job.builder)
    state: dict[str, Any] = {"iteration": 0, "parent": None}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / "state.json").read_text())
    score = state.get("reward", INVALID_REWARD)  # the trial's reward so far (what epoch reports carry)
    budget = job.search.budget
    for iteration in range(state["iteration"] + 1, job.search.iterations + 1):
        # Once a point meets the budget, pruning stops: the trial's remaining iterations fine-tune that point.
        met = state.get("budget_met", False)
        spec = iteration_spec(job, sample, state["parent"], prune=not met,
                              steps_left=job.search.iterations - iteration + 1)
        # a fresh candidate's epochs are checkpointed with the trial's state: a restart goes on mid-iteration
        keeper = TrialCheckpoints(spec_hash=spec.spec_hash, files={"state.json": json.dumps(state)},
                                  fixed={"reward": score})
        metrics, cached = stored_or_kept(spec, ctx, callbacks=[keeper])
        ok = metrics.status == "ok"
        reason = stop_reason(metrics.val_accuracy, job.teacher_val_accuracy, job.search.stop) if ok else \
            f"invalid: {metrics.error}"
        score = reward(metrics.params, metrics.val_accuracy, job.teacher_params, job.teacher_val_accuracy,
                       job.search.reward) if ok else INVALID_REWARD
        state = {"iteration": iteration, "parent": spec.spec_hash, "reward": score,
                 "budget_met": met or (ok and budget is not None and bool(budget.within(metrics.get)))}
        report = {"iteration": iteration, "val_accuracy": metrics.val_accuracy or 0.0, "params": metrics.params or 0,
                  "reward": score, **report_fields(spec, metrics, cached, iteration=iteration, **run_columns(metrics),
                                                   filters=metrics.get("filters"), stop_reason=reason,
                                                   phase="fine-tune" if met else "prune")}
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps(state))
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))
        if reason:
            return


def run_taylor(context: RunContext) -> None:
    """The taylor driver: a Tune sweep of pruning trajectories, recorded row by row into the run."""
    search: TaylorSearch = context.config.search
    ensure_ray(context.address)
    prepare_teacher_logits(context)
    teacher = context.teacher
    job = TrialJob(store=context.store, arch=context.config.teacher.base, teacher_hash=teacher.teacher_hash,
                   teacher_val_accuracy=teacher.val_accuracy, teacher_params=count_parameters(teacher.model),
                   teacher_channels=prunable_channels(teacher.model, context.splits.inputs),
                   dataset=absolute_dataset(context.config.dataset),
                   train=context.config.train, search=search, resources=context.config.resources,
                   seed=context.config.seed, measures=measures_of(context.config),
                   builder=context.builder)
    recorder = TrialRecorder(context, search.reward, total=trial_count(search) * search.iterations)
    tuner = build_tuner(context, taylor_trial, job, param_space(search, context.config.train), search.tune,
                              metric=TUNE_METRICS[search.tune.metric], time_attr="iteration",
                              max_t=search.iterations, recorder=recorder)
    fit(context, tuner, recorder)
    finish(recorder)


def finish(recorder: TrialRecorder) -> None:
    """Mark the Pareto front, store the trajectory plot and a per-trial summary, write the table."""
    context = recorder.context
    front = mark_pareto(recorder.rows)
    rows = list(recorder.rows.values())
    plot = layout.run_plot(context.run_id, layout.TRAJECTORY_PLOT)
    png = trajectory_png(rows, recorder.teacher_params, recorder.teacher_accuracy,
                         title=f"Taylor pruning, run {context.run_id}")
    context.store.put_bytes(plot, png)
    trials = trial_summaries(rows)
    context.store.put_json(layout.run_trials(context.run_id), trials)
    recorder.close()
    context.summary.update(trials=len(trials), pareto=len(front),
                           plot=context.store.uri_for(plot))


def trial_summaries(rows: list[ResultRow]) -> dict[str, dict[str, Any]]:
    """Per trial: its sample, iterations done, why it stopped, and its best model within the stop rule."""
    trials: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: (r.get("trial"), r.get("iteration"))):
        trial = trials.setdefault(row.get("trial"), {"sample": json.loads(row.get("sample")), "iterations": 0,
                                                     "stop_reason": None, "best": None})
        trial["iterations"] = row.get("iteration")
        trial["stop_reason"] = row.get("stop_reason")
        if row.ok and row.get("stop_reason") is None and (
                trial["best"] is None or row.reward > trial["best"]["reward"]):
            trial["best"] = {k: row.get(k) for k in ("spec_hash", "iteration", "accuracy", "params", "compression",
                                                     "reward", "artifact")}
    return trials
