"""The sweeps whose trial is one candidate (agp, rigl): `candidate_trial` evaluates it inside the trial (or
finds it stored), `run_sparse_sweep` runs the Tune sweep of them, and its rows are sized by their non-zero
parameters (`SparseRecorder`): what a sparse model stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ray import tune

from searchsvc.budget import measures_of
from searchsvc.reporting.plots import trajectory_png
from searchsvc.running.job import RunContext
from searchsvc.running.ray_start import ensure_ray
from searchsvc.running.recorder import prepare_teacher_logits
from searchsvc.sweeps.checkpoints import TrialCheckpoints
from searchsvc.sweeps.reports import TrialRecorder, report_fields
from searchsvc.sweeps.schema import SweepTune
from searchsvc.sweeps.space import TUNE_METRICS
from searchsvc.sweeps.tuner import absolute_dataset, build_tuner, fit, mark_pareto, stored_or_kept
from storage import ArtifactStore, layout
from workers.data.datasets import DatasetConfig
from workers.evaluation.evaluate import load_candidate_model
from workers.evaluation.pool import worker_context
from workers.evaluation.resources import Resources
from workers.evaluation.spec import Builder, CandidateSpec
from workers.measurement.run_measures import Measures, run_columns
from workers.measurement.summary import SUMMARY_KINDS, summary, to_csv
from workers.training.train import TrainConfig


class SparseRecorder(TrialRecorder):
    size = "nonzero_params"  # what a sparse model stores: compression, reward and the front count it


def finish_sparse(recorder: SparseRecorder, trials: int, title: str) -> None:
    """Pareto front by non-zero parameters, sparsity / compute summaries of every kept model, the plot."""
    context = recorder.context
    front = mark_pareto(recorder.rows, size=SparseRecorder.size)
    rows = list(recorder.rows.values())
    run_id, plot = context.run_id, layout.run_plot(context.run_id, layout.TRAJECTORY_PLOT)
    for row in rows:
        if not row.ok or not row.artifact:
            continue
        model = load_candidate_model(context.store, row.spec_hash)
        for kind in SUMMARY_KINDS:
            context.store.put_bytes(layout.run_summary(run_id, row.spec_hash, kind),
                                    to_csv(summary(model, kind, context.splits.inputs)))
    png = trajectory_png(rows, recorder.teacher_params, recorder.teacher_accuracy, title=title, size=SparseRecorder.size)
    context.store.put_bytes(plot, png)
    recorder.close()
    context.summary.update(trials=trials, pareto=len(front),
                           plot=context.store.uri_for(plot),
                           summaries=context.store.uri_for(layout.summaries_prefix(run_id)))


@dataclass(frozen=True)
class CandidateJob:
    """What a one-candidate-per-trial method's trials need from the driver (sent once, with_parameters)."""

    store: ArtifactStore
    arch: str
    teacher_hash: str
    dataset: DatasetConfig
    train: TrainConfig
    resources: Resources
    seed: int
    measures: Measures = Measures()  # the run's own measurements of each candidate (workers.measurement.run_measures)
    builder: Builder | None = None  # the method's own candidate builder (its registry entry's)

    @classmethod
    def of(cls, context: RunContext, **extra: Any) -> CandidateJob:
        config = context.config
        return cls(store=context.store, arch=config.teacher.base, teacher_hash=context.teacher.teacher_hash,
                   dataset=absolute_dataset(config.dataset), train=config.train, resources=config.resources,
                   seed=config.seed, measures=measures_of(config),
                   builder=context.builder, **extra)


def candidate_trial(job: CandidateJob, spec: CandidateSpec, progress_key: str, row_keys: tuple[str, ...]) -> None:
    """A trial that is one candidate: evaluate it (or find it stored), reporting validation accuracy and
    `progress_key` after each epoch, then one final report that becomes its row (`row_keys` as columns)."""
    ctx = worker_context(job.store, job.teacher_hash, job.dataset, job.resources, job.measures, job.builder)
    metrics, cached = stored_or_kept(spec, ctx, callbacks=[TrialCheckpoints(progress_key, spec_hash=spec.spec_hash)])
    row = {**{k: v for k in row_keys if (v := metrics.get(k)) is not None}, **run_columns(metrics)}
    tune.report({"epoch": spec.train.epochs, "val_accuracy": metrics.val_accuracy or 0.0,
                 progress_key: row.get(progress_key, 0.0),
                 **report_fields(spec, metrics, cached, **row)})


def run_sparse_sweep(context: RunContext, trial: Callable[..., None], job: CandidateJob, space: dict[str, Any],
                     sweep: SweepTune, reward_form: str, total: int, epochs: int, title: str) -> None:
    """A sweep of one-candidate trials (agp, rigl): ASHA on validation accuracy per epoch, rows sized by their
    non-zero parameters, then the Pareto front, summaries and the plot."""
    ensure_ray(context.address)
    prepare_teacher_logits(context)
    recorder = SparseRecorder(context, reward_form, total=total)
    tuner = build_tuner(context, trial, job, space, sweep, metric=TUNE_METRICS["accuracy"], time_attr="epoch",
                        max_t=epochs, recorder=recorder)
    grid = fit(context, tuner, recorder)
    finish_sparse(recorder, trials=len(grid), title=title)
