"""`method: grid` — evaluate an explicit list of transformations of the teacher.

    search:
      round_to: 8                      # widths rounded up: to 8s in groups wider than 16, 4s in groups of 9-16 (default)
      candidates:
        - {scale: 0.5}                 # every width halved
        - {remove: [layer1.1, layer2.2]}
        - {remove: [layer3.1], widths: {layer3: 48, layer2.0: 16}}
"""

from __future__ import annotations

from searchsvc.methods.grid import GridSearch
from searchsvc.methods.grid.widths import candidate_widths, teacher_widths
from searchsvc.running.job import RunContext
from searchsvc.running.ray_start import ensure_ray
from searchsvc.running.recorder import Evaluator
from workers.evaluation.spec import CandidateSpec


def grid_specs(context: RunContext) -> list[CandidateSpec]:
    """The specs of the configured candidates (duplicates kept once)."""
    search: GridSearch = context.config.search
    splits = context.splits
    specs = []
    for c in search.candidates:
        teacher = teacher_widths(context.teacher.model, tuple(c.remove), splits.inputs)
        specs.append(CandidateSpec(
            arch=context.config.teacher.base, teacher=context.teacher.teacher_hash, dataset=context.config.dataset,
            train=context.config.train, method="grid", removed=tuple(c.remove),
            widths=tuple(candidate_widths(teacher, c, search.round_to).items()), seed=context.config.seed))
    return list(dict.fromkeys(specs))


def run_grid(context: RunContext) -> None:
    """The grid driver: every candidate through the pool, rows into the run."""
    specs = grid_specs(context)
    if not specs:
        return  # an empty grid: the run records its teacher and nothing else (no Ray needed)
    ensure_ray(context.address)
    evaluator = Evaluator(context, context.config.search.reward, total=len(specs))
    try:
        evaluator.evaluate(specs)
    finally:
        evaluator.close()
