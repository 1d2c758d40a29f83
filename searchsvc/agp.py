"""`method: agp` — gradual pruning from a Distiller-style schedule, one Ray Tune trial per sample.

    search:
      schedule: configs/schedules/resnet20-element.agp.yaml    # or the mapping itself, inline
      tune: {final_sparsity: [0.8, {stages: 0.9}], ending_epoch: [6], lr: [0.02]}   # 2 trials

Each trial trains a copy of the teacher for `train.epochs` with its schedule variant in the loop
(workers/agp.py), reporting test accuracy and sparsity to Tune after every epoch (ASHA stops the weak
ones), then thins the network and stores it as one candidate. Result rows carry sparsity, non-zero
parameters, and MACs before and after thinning; size for compression, reward and the Pareto front is
the non-zero parameter count. At the end the run stores, per kept model, its sparsity and compute
summaries (runs/<id>/summaries/<hash>-{sparsity,compute}.csv), the plot and trials.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any

from ray import tune

from searchsvc import sweep
from searchsvc.evaluator import ensure_ray, prepare_teacher_logits
from searchsvc.job import RunContext
from searchsvc.methods import AgpSearch
from searchsvc.plots import trajectory_png
from searchsvc.schedules import schedule_variants
from searchsvc.sweep import TrialRecorder, absolute_dataset, choose, report_fields
from storage import ArtifactStore
from storage.tables import run_prefix
from workers.agp import put_schedule
from workers.data import DatasetConfig
from workers.evaluate import evaluate_candidate, load_candidate_model, stored_metrics
from workers.pool import worker_context
from workers.resources import Resources
from workers.spec import CandidateSpec
from workers.summary import SUMMARY_KINDS, summary, to_csv
from workers.train import TrainCallback, TrainConfig

log = logging.getLogger(__name__)
ROW_KEYS = ("sparsity", "nonzero_params", "nonzero_macs", "macs_before_thinning", "sparsity_before_thinning")


@dataclass(frozen=True)
class AgpJob:
    """What every trial needs from the driver (sent once, through tune.with_parameters)."""

    store: ArtifactStore
    arch: str
    teacher_hash: str
    dataset: DatasetConfig
    train: TrainConfig
    resources: Resources
    seed: int


def param_space(search: AgpSearch, train: TrainConfig, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """A grid over the schedule variants (and epoch choices), lr as choices or a log-uniform range."""
    return {"variant": choose(tuple(variants), variants[0]), "lr": sweep.lr_space(search.tune, train.lr),
            "epochs": choose(search.tune.epochs, train.epochs)}


def trial_spec(job: AgpJob, sample: dict[str, Any]) -> CandidateSpec:
    train = replace(job.train, lr=float(sample["lr"]), epochs=int(sample["epochs"]))
    return CandidateSpec(arch=job.arch, teacher=job.teacher_hash, dataset=job.dataset, train=train, method="agp",
                         schedule=sample["variant"]["schedule"], seed=job.seed)


class EpochReport(TrainCallback):
    """Test accuracy and sparsity to Tune after each epoch but the last (the trial's final report,
    with the stored candidate, is that one: ASHA stops a trial that reaches max_t)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        if epoch + 1 < self.epochs:
            tune.report({"epoch": epoch + 1, "accuracy": record["test_accuracy"], "sparsity": record.get("sparsity", 0.0)})


def agp_trial(sample: dict[str, Any], job: AgpJob) -> None:
    """One Tune trial: train under the sample's schedule, thin, measure, store, report."""
    ctx = worker_context(job.store, job.teacher_hash, job.dataset, job.resources)
    spec = trial_spec(job, sample)
    metrics = stored_metrics(job.store, spec.spec_hash)
    cached = metrics is not None
    if metrics is None:
        metrics = evaluate_candidate(spec, ctx, callbacks=[EpochReport(spec.train.epochs)])
    row = {k: metrics.get(k) for k in ROW_KEYS}
    tune.report({"epoch": spec.train.epochs, "accuracy": metrics["accuracy"], "sparsity": row["sparsity"] or 0.0,
                 **report_fields(spec, metrics, cached, **row, thinned=json.dumps(metrics.get("thinned") or {}))})


class AgpRecorder(TrialRecorder):
    size = "nonzero_params"  # what a sparse model stores: compression, reward and the front count it


def run_agp(context: RunContext) -> None:
    """The agp driver: store the schedule variants, sweep them with Tune, then summaries and the plot."""
    search: AgpSearch = context.config.search
    ensure_ray(context.address)
    prepare_teacher_logits(context)
    variants = [{"schedule": put_schedule(context.store, v["raw"]), "final_sparsity": v["final_sparsity"],
                 "ending_epoch": v["ending_epoch"]} for v in schedule_variants(search, context.config.teacher.arch)]
    job = AgpJob(store=context.store, arch=context.config.teacher.arch, teacher_hash=context.teacher.teacher_hash,
                 dataset=absolute_dataset(context.config.dataset), train=context.config.train,
                 resources=context.config.resources, seed=context.config.seed)
    total = sweep.trial_count(search.tune, tuple(variants), search.tune.epochs)
    recorder = AgpRecorder(context, search.reward, total=total)
    epochs = max(search.tune.epochs or (context.config.train.epochs,))
    tuner = sweep.build_tuner(context, agp_trial, job, param_space(search, context.config.train, variants),
                              search.tune, metric="accuracy", time_attr="epoch", max_t=epochs)
    grid = sweep.fit(context, tuner, recorder)
    finish(recorder, trials=len(grid))


def finish(recorder: AgpRecorder, trials: int) -> None:
    """Pareto front by non-zero parameters, summaries of every kept model, the plot; the table last."""
    ctx = recorder.ctx
    rows = list(recorder.rows.values())
    front = sweep.mark_pareto(rows, size=AgpRecorder.size)
    prefix = run_prefix(ctx.run_id)
    size = ctx.splits.in_channels, ctx.splits.image_size
    for row in rows:
        if row["status"] != "ok" or not row.get("artifact"):
            continue
        model = load_candidate_model(ctx.store, row["spec_hash"])
        for kind in SUMMARY_KINDS:
            ctx.store.put_bytes(f"{prefix}/summaries/{row['spec_hash']}-{kind}.csv", to_csv(summary(model, kind, *size)))
    png = trajectory_png(rows, recorder.teacher_params, recorder.teacher_accuracy,
                         title=f"AGP, run {ctx.run_id}", size=AgpRecorder.size)
    ctx.store.put_bytes(f"{prefix}/plots/trajectory.png", png)
    recorder.close()
    ctx.summary.update(trials=trials, pareto=len(front), plot=ctx.store.uri_for(f"{prefix}/plots/trajectory.png"),
                       summaries=ctx.store.uri_for(f"{prefix}/summaries/"))
