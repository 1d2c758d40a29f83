"""`method: agp` — gradual pruning from a Distiller-style schedule, one Ray Tune trial per sample.

    search:
      schedule: configs/schedules/resnet20-element.agp.yaml    # or the mapping itself, inline
      tune: {final_sparsity: [0.8, {stages: 0.9}], ending_epoch: [6], lr: [0.02]}   # 2 trials

Each trial trains a copy of the teacher for `train.epochs` with its schedule variant in the loop
(workers/compression/agp.py), reporting validation accuracy and sparsity to Tune after every epoch (ASHA stops the weak
ones), then thins the network and stores it as one candidate. Result rows carry sparsity, non-zero
parameters, and MACs before and after thinning; size for compression, reward and the Pareto front is
the non-zero parameter count. At the end the run stores, per kept model, its sparsity and compute
summaries (runs/<id>/summaries/<hash>-{sparsity,compute}.csv), the plot and trials.json. With
`search.budget`, a variant whose pruned and thinned teacher (its smallest possible model) is over the
budget is skipped before the sweep.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from searchsvc.budget import Budget, feasible
from searchsvc.methods.agp import AgpSearch
from searchsvc.methods.agp.variants import schedule_variants
from searchsvc.running.job import RunContext
from searchsvc.sweeps.space import choose, lr_space, trial_count
from searchsvc.sweeps.sparse import CandidateJob, candidate_trial, run_sparse_sweep
from workers.compression.agp import final_footprint, put_schedule
from workers.evaluation.spec import CandidateSpec
from workers.training.train import TrainConfig

log = logging.getLogger(__name__)
ROW_KEYS = ("sparsity", "nonzero_params", "nonzero_macs", "macs_before_thinning", "sparsity_before_thinning",
            "thinned")


def param_space(search: AgpSearch, train: TrainConfig, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """A grid over the schedule variants (and epoch choices), lr as choices or a log-uniform range."""
    return {"variant": choose(tuple(variants), variants[0]), "lr": lr_space(search.tune, train.lr),
            "epochs": choose(search.tune.epochs, train.epochs)}


def trial_spec(job: CandidateJob, sample: dict[str, Any]) -> CandidateSpec:
    train = replace(job.train, lr=float(sample["lr"]), epochs=int(sample["epochs"]))
    return CandidateSpec(arch=job.arch, teacher=job.teacher_hash, dataset=job.dataset, train=train, method="agp",
                         schedule=sample["variant"]["schedule"], seed=job.seed)


def agp_trial(sample: dict[str, Any], job: CandidateJob) -> None:
    """One Tune trial: train under the sample's schedule, thin, measure, store, report."""
    candidate_trial(job, trial_spec(job, sample), "sparsity", ROW_KEYS)


def within_reach(parsed: list[dict[str, Any]], budget: Budget, context: RunContext) -> list[dict[str, Any]]:
    """The schedule variants whose smallest model (`final_footprint`) meets the budget (budget.feasible)."""
    splits, model = context.splits, context.teacher.model
    example = splits.inputs.example(model)
    return feasible(parsed, budget,
                    lambda v: final_footprint(model, v["schedule"], example, splits.inputs),
                    lambda v: f"the variant final_sparsity={v['final_sparsity']}, ending_epoch={v['ending_epoch']}",
                    "prune more (search.tune.final_sparsity) or loosen the budget")


def run_agp(context: RunContext) -> None:
    """The agp driver: store the schedule variants, sweep them with Tune, then summaries and the plot."""
    search: AgpSearch = context.config.search
    splits = context.splits
    parsed = schedule_variants(search, context.teacher.model,
                               splits.inputs.example(context.teacher.model))
    epochs = max(search.tune.epochs or (context.config.train.epochs,))
    for v in parsed:
        if v["schedule"].last_epoch() >= epochs:
            log.warning("the schedule acts until epoch %d (from 0) but trials train %d epochs: pruning stops "
                        "short of its final sparsities", v["schedule"].last_epoch(), epochs)
    if search.budget is not None:
        parsed = within_reach(parsed, search.budget, context)
    variants = [{"schedule": put_schedule(context.store, v["raw"]), "final_sparsity": v["final_sparsity"],
                 "ending_epoch": v["ending_epoch"]} for v in parsed]
    run_sparse_sweep(context, agp_trial, CandidateJob.of(context),
                     param_space(search, context.config.train, variants), search.tune, search.reward,
                     total=trial_count(search.tune, tuple(variants), search.tune.epochs), epochs=epochs,
                     title=f"AGP, run {context.run_id}")
