"""`method: grid` — evaluate an explicit list of transformations of the teacher.

    search:
      round_to: 8                      # channel counts rounded up to a multiple of 8
      candidates:
        - {scale: 0.5}                 # every width halved
        - {remove: [layer1.1, layer2.2]}
        - {remove: [layer3.1], widths: {layer3: 48, layer2.0: 16}}
"""

from __future__ import annotations

from core.names import is_int
from searchsvc.evaluator import Evaluator, ensure_ray
from searchsvc.job import RunContext
from searchsvc.methods import GridCandidate, GridSearch
from workers.spec import CandidateSpec
from workers.surgery import round_width, width_keys
from workers.zoo import ResNetArch


def candidate_widths(arch: ResNetArch, candidate: GridCandidate, round_to: int) -> dict[str, int]:
    """Final widths (only those that differ from the teacher's), after scaling and rounding.

    Explicit widths that are not integers or not known keys pass through unchanged, so surgery
    reports them as an invalid candidate rather than the driver guessing.
    """
    teacher = width_keys(arch)
    widths: dict[str, int] = {}
    if candidate.scale is not None:
        widths = {k: round_width(max(1, round(w * candidate.scale)), round_to, w) for k, w in teacher.items()}
    for key, width in candidate.widths.items():
        valid = key in teacher and is_int(width) and 1 <= width <= teacher[key]
        widths[key] = round_width(width, round_to, teacher[key]) if valid else width
    return {k: w for k, w in widths.items() if teacher.get(k) != w}


def grid_specs(context: RunContext) -> list[CandidateSpec]:
    """The specs of the configured candidates (duplicates kept once)."""
    search: GridSearch = context.config.search
    arch = context.teacher.model.arch
    specs = [
        CandidateSpec(arch=context.config.teacher.arch, teacher=context.teacher.teacher_hash,
                      dataset=context.config.dataset, train=context.config.train, method="grid",
                      removed=tuple(c.remove), widths=tuple(candidate_widths(arch, c, search.round_to).items()),
                      seed=context.config.seed)
        for c in search.candidates
    ]
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
