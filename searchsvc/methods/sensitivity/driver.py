"""Sensitivity analysis (`searchsvc sensitivity CONFIG`): prune each layer alone, see what it costs.

For every weight (or filter group) and every level in `levels`, the teacher with only that weight
pruned to that sparsity is evaluated without fine-tuning — all points in parallel on the actor pool
(workers/compression/agp.py:sensitivity_step). The run stores

    runs/<id>/sensitivity.csv          weight, level, accuracy, drop (points), sparsity, non-zero params
    runs/<id>/plots/sensitivity.png    accuracy vs sparsity, one line per layer
    runs/<id>/sensitivity.agp.yaml     a starting AGP schedule: each layer's final sparsity is the
                                       highest level whose drop (and every lower level's) is within
                                       `tolerance` points of the unpruned network
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import yaml

from searchsvc.methods.sensitivity import SensitivitySearch
from searchsvc.methods.sensitivity.weights import analysed_weights
from searchsvc.reporting.plots import sensitivity_png
from searchsvc.reporting.rows import ResultRow
from searchsvc.running.job import RunContext
from searchsvc.running.ray_start import ensure_ray
from searchsvc.running.recorder import Evaluator
from storage import layout
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics
from workers.measurement.summary import to_csv


def sensitivity_specs(context: RunContext, weights: list[str]) -> list[CandidateSpec]:
    search: SensitivitySearch = context.config.search
    return [CandidateSpec(arch=context.config.teacher.base, teacher=context.teacher.teacher_hash,
                          dataset=context.config.dataset, train=context.config.train, method="sensitivity",
                          seed=context.config.seed,
                          params=(("level", float(level)), ("structure", search.structure), ("weight", weight)))
            for weight in weights for level in search.levels]


class SensitivityEvaluator(Evaluator):
    """Rows with the pruned weight, its level and structure beside the usual columns."""

    def columns(self, spec: CandidateSpec, metrics: CandidateMetrics) -> dict[str, Any]:
        params = dict(spec.params)
        return {"weight": params["weight"], "level": params["level"], "structure": params["structure"],
                "sparsity": metrics.get("sparsity"), "nonzero_params": metrics.get("nonzero_params")}


def run_sensitivity(context: RunContext) -> None:
    """The sensitivity driver: every (weight, level) point through the pool; CSV, plot, schedule."""
    search: SensitivitySearch = context.config.search
    teacher, splits = context.teacher.model, context.splits
    weights = analysed_weights(teacher, search, splits.inputs.example(teacher))
    specs = sensitivity_specs(context, weights)
    ensure_ray(context.address)
    evaluator = SensitivityEvaluator(context, total=len(specs))
    try:
        rows = evaluator.evaluate(specs)
    finally:
        evaluator.close()
    table = sensitivity_table(rows, context.teacher.val_accuracy)
    run_id, store = context.run_id, context.store
    keys = {"sensitivity": layout.sensitivity_table(run_id), "plot": layout.run_plot(run_id, layout.SENSITIVITY_PLOT),
            "schedule": layout.sensitivity_schedule(run_id)}
    store.put_bytes(keys["sensitivity"], to_csv(table))
    title = f"{search.structure} sensitivity, {context.config.teacher.base}"
    store.put_bytes(keys["plot"], sensitivity_png(table, context.teacher.val_accuracy, title=title))
    schedule = starting_schedule(table, search)
    store.put_bytes(keys["schedule"], yaml.safe_dump(schedule, sort_keys=False).encode())
    context.summary.update({name: store.uri_for(key) for name, key in keys.items()})


def sensitivity_table(rows: list[ResultRow], baseline: float) -> list[dict[str, Any]]:
    """One entry per point, by weight then level; `drop` in validation accuracy points below `baseline` (the
    teacher's validation accuracy, 0..1): the starting schedule is a choice. Test accuracy is reported beside."""
    table = [{"weight": r.get("weight"), "level": r.get("level"), "val_accuracy": r.val_accuracy,
              "accuracy": r.accuracy, "drop": 100 * (baseline - (r.val_accuracy or 0.0)), "sparsity": r.get("sparsity"),
              "nonzero_params": r.get("nonzero_params"), "status": r.status} for r in rows]
    return sorted(table, key=lambda t: (t["weight"], t["level"]))


def tolerated_levels(table: list[dict[str, Any]], tolerance: float) -> dict[str, float]:
    """Per weight, the highest level such that it and every lower level drop at most `tolerance` points."""
    by_weight: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in table:
        by_weight[entry["weight"]].append(entry)
    chosen = {}
    for weight, entries in by_weight.items():
        level = 0.0
        for entry in sorted(entries, key=lambda e: e["level"]):
            if entry["status"] != "ok" or entry["drop"] > tolerance:
                break
            level = entry["level"]
        chosen[weight] = level
    return chosen


def starting_schedule(table: list[dict[str, Any]], search: SensitivitySearch) -> dict[str, Any]:
    """A Distiller schedule: one AGP pruner per tolerated level (layers that tolerate none are left out)."""
    by_level: dict[float, list[str]] = defaultdict(list)
    for weight, level in sorted(tolerated_levels(table, search.tolerance).items()):
        if level > 0:
            by_level[level].append(weight)
    cls = "AutomatedGradualPruner" if search.structure == "element" else "StructuredAGP"
    pruners = {f"level_{round(100 * level)}": {"class": cls, "initial_sparsity": 0.0, "final_sparsity": level,
                                                "weights": weights}
               for level, weights in sorted(by_level.items())}
    policies = [{"pruner": {"instance_name": name}, "starting_epoch": 0,
                 "ending_epoch": search.schedule_ending_epoch, "frequency": 1} for name in pruners]
    return {"version": 1, "pruners": pruners, "policies": policies}
