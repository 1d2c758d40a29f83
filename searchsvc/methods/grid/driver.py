"""`method: grid` — evaluate an explicit list of transformations of the teacher.

    search:
      round_to: 8                      # channel counts rounded up to a multiple of 8
      candidates:
        - {scale: 0.5}                 # every width halved
        - {remove: [layer1.1, layer2.2]}
        - {remove: [layer3.1], widths: {layer3: 48, layer2.0: 16}}
"""

from __future__ import annotations

import copy

from torch import nn

from core.names import is_int
from searchsvc.methods.grid import GridCandidate, GridSearch
from searchsvc.running.job import RunContext
from searchsvc.running.recorder import Evaluator, ensure_ray
from workers.evaluation.spec import CandidateSpec
from workers.models.depgraph import channel_groups, example_input, removable_units
from workers.models.rebuild import remove_units
from workers.models.surgery import round_width, width_keys


def teacher_widths(teacher: nn.Module, removed: tuple[str, ...], in_channels: int, image_size: int) -> dict[str, int]:
    """Every width a candidate may set, with the teacher's value: the zoo's width keys, or for a user's
    network the channel groups (by root layer) left after `removed` units go (none if a unit is unknown:
    the worker then reports the candidate invalid, naming it)."""
    if hasattr(teacher, "arch"):
        return width_keys(teacher.arch)
    example = example_input(teacher, in_channels, image_size)
    if not set(removed) <= set(removable_units(teacher, example)):
        return {}
    cut = remove_units(copy.deepcopy(teacher), removed)
    return {group.key: group.channels for group in channel_groups(cut, example)}


def candidate_widths(teacher: dict[str, int], candidate: GridCandidate, round_to: int) -> dict[str, int]:
    """Final widths (only those that differ from the teacher's `width key → channels`), after scaling and
    rounding.

    Explicit widths that are not integers or not known keys pass through unchanged, so surgery
    reports them as an invalid candidate rather than the driver guessing.
    """
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
    splits = context.splits
    specs = []
    for c in search.candidates:
        teacher = teacher_widths(context.teacher.model, tuple(c.remove), splits.in_channels, splits.image_size)
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
