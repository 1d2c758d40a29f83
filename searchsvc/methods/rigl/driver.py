"""`method: rigl` — RigL dynamic sparse training, one Ray Tune trial per combination of settings.

    search:
      dense_allocation: 0.1          # the fixed share of non-zero weights in the sparse layers
      delta: 100                     # steps between drop / grow updates, until t_end_fraction of all steps
      init: scratch                  # or teacher (distillation from the teacher: train.distill.alpha > 0)
      tune: {dense_allocation: [0.05, 0.1], distribution: [uniform, erk]}   # 4 trials
      # tune: {static_topo: [false, true]}: RigL against the static sparse baseline, same masks and seed

Each trial trains one candidate (workers/compression/rigl.py: the teacher's architecture, fresh or the teacher's
weights) with RigL gating every optimizer step, reporting validation accuracy and density to Tune after
each epoch (ASHA stops weak trials), then stores it. Rows carry density, sparsity and non-zero
parameters; compression, reward and the Pareto front count non-zero parameters. With `search.budget`, a
(dense_allocation, distribution) pair whose model is over the budget is skipped before the sweep: each
layer's density is fixed from the first step, so its size is known without training.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from searchsvc.budget import Budget, feasible
from searchsvc.methods.rigl import RigLSearch
from searchsvc.running.job import RunContext
from searchsvc.sweeps.space import choose, lr_space, trial_count
from searchsvc.sweeps.sparse import CandidateJob, candidate_trial, run_sparse_sweep
from workers.compression.rigl import sparse_footprint
from workers.evaluation.spec import CandidateSpec
from workers.training.train import TrainConfig

ROW_KEYS = ("density", "sparsity", "nonzero_params", "nonzero_macs", "rigl_updates")


@dataclass(frozen=True)
class RigLJob(CandidateJob):
    search: RigLSearch | None = None


def param_space(search: RigLSearch, train: TrainConfig,
                settings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A grid over the choice lists (a list left empty keeps `search`'s value), lr as choices or a range.
    `settings`: the (dense_allocation, distribution) pairs to try, as one grid dimension (those within a budget)."""
    t = search.tune
    space = {"dense_allocation": choose(t.dense_allocation, search.dense_allocation),
             "delta": choose(t.delta, search.delta), "alpha": choose(t.alpha, search.alpha),
             "distribution": choose(t.distribution, search.distribution),
             "static_topo": choose(t.static_topo, search.static_topo), "lr": lr_space(t, train.lr)}
    if settings is not None:
        del space["dense_allocation"], space["distribution"]
        space["setting"] = choose(tuple(settings), settings[0])
    return space


def sparsity_settings(search: RigLSearch) -> list[dict[str, Any]]:
    """Every (dense_allocation, distribution) pair of the sweep."""
    t = search.tune
    return [{"dense_allocation": d, "distribution": dist} for d in (t.dense_allocation or (search.dense_allocation,))
            for dist in (t.distribution or (search.distribution,))]


def within_reach(search: RigLSearch, budget: Budget, context: RunContext) -> list[dict[str, Any]]:
    """The sparsity settings whose model (`sparse_footprint`: its size is fixed from the first step) meets
    the budget (budget.feasible)."""
    splits = context.splits

    def footprint(setting: dict[str, Any]) -> dict[str, int]:
        return sparse_footprint(context.teacher.model, splits.inputs,
                                dense_allocation=setting["dense_allocation"],
                                sparsity_distribution=setting["distribution"],
                                ignore_linear_layers=search.ignore_linear_layers)

    return feasible(sparsity_settings(search), budget, footprint,
                    lambda s: f"dense_allocation={s['dense_allocation']}, distribution={s['distribution']}",
                    "lower dense_allocation or loosen the budget")


def trial_spec(job: RigLJob, sample: dict[str, Any]) -> CandidateSpec:
    s = job.search
    setting = sample.get("setting", sample)  # a budget's sweep pairs the two (searchsvc.methods.rigl.driver.within_reach)
    params = {"alpha": float(sample["alpha"]), "delta": int(sample["delta"]),
              "dense_allocation": float(setting["dense_allocation"]), "grad_accumulation_n": s.grad_accumulation_n,
              "ignore_linear_layers": s.ignore_linear_layers, "init": s.init,
              # (a run started before tune.static_topo existed has no such key in its samples)
              "sparsity_distribution": str(setting["distribution"]),
              "static_topo": bool(sample.get("static_topo", s.static_topo)), "t_end_fraction": s.t_end_fraction}
    return CandidateSpec(arch=job.arch, teacher=job.teacher_hash, dataset=job.dataset,
                         train=replace(job.train, lr=float(sample["lr"])), method="rigl", seed=job.seed,
                         params=tuple(params.items()))


def rigl_trial(sample: dict[str, Any], job: RigLJob) -> None:
    """One Tune trial: train one sparse candidate under RigL, store it, report it."""
    candidate_trial(job, trial_spec(job, sample), "density", ROW_KEYS)


def run_rigl(context: RunContext) -> None:
    """The rigl driver: a Tune sweep of RigL trainings, recorded row by row; summaries and plot at the end."""
    search: RigLSearch = context.config.search
    t = search.tune
    settings = within_reach(search, search.budget, context) if search.budget is not None else None
    pairs = (tuple(settings), ()) if settings is not None else (t.dense_allocation, t.distribution)
    run_sparse_sweep(context, rigl_trial, RigLJob.of(context, search=search),
                     param_space(search, context.config.train, settings), t, search.reward,
                     total=trial_count(t, pairs[0], t.delta, t.alpha, pairs[1], t.static_topo),
                     epochs=context.config.train.epochs, title=f"RigL, run {context.run_id}")
