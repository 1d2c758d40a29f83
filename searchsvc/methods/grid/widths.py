"""What a grid candidate may name — the teacher's removable blocks and width keys — and the check at `validate`
that every candidate names only those (no Ray here: `validate` imports this, the driver too).

A zoo teacher's structure is data (its arch: blocks and width keys, no weights built); a user's network is traced
on the data's shape, as the run will trace it: units by torch.fx, channel groups by Torch-Pruning's graph of the
network left after the candidate's removals.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from core.names import did_you_mean, is_int
from workers.models.inputs import InputSpec
from workers.models.surgery import InvalidTransform, derive_arch, round_width, width_keys

if TYPE_CHECKING:
    from searchsvc.config import JobConfig
    from searchsvc.methods.grid import GridCandidate
    from workers.models.zoo import ResNetArch

LISTED = 12  # names listed in a message at most (a torchvision ResNet-50 has 50 channel groups)


def teacher_widths(teacher: nn.Module, removed: tuple[str, ...], inputs: InputSpec) -> dict[str, int]:
    """Every width a candidate may set, with the teacher's value: the zoo's width keys, or for a user's
    network the channel groups (by root layer) left after `removed` units go (none if a unit is unknown:
    the worker then reports the candidate invalid, naming it)."""
    from workers.models.depgraph import channel_groups, removable_units
    from workers.models.rebuild import remove_units

    if hasattr(teacher, "arch"):
        return width_keys(teacher.arch)
    example = inputs.example(teacher)
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


def grid_problems(config: JobConfig) -> list[str]:
    """Each candidate's removals and widths against the teacher's real structure: one line per problem, by key."""
    from workers.models.zoo import model_arch

    if config.teacher.source is None:
        return _zoo_problems(config, model_arch(config.teacher.arch))
    return _traced_problems(config)


def _zoo_problems(config: JobConfig, arch: ResNetArch) -> list[str]:
    """A zoo teacher: its blocks and width keys from its arch (as surgery's `derive_arch` checks them at run)."""
    blocks, keys = arch.block_names(), width_keys(arch)
    problems = []
    for i, candidate in enumerate(config.search.candidates):
        where = f"search.candidates[{i}]"
        found = _name_problems(where, candidate, (blocks, f"a block of {config.teacher.arch}", "blocks"),
                               (keys, "width key"))
        if found:
            problems.extend(found)
            continue
        try:  # what only the whole transformation tells: two residual streams merged by the widths
            derive_arch(arch, candidate.remove, candidate_widths(keys, candidate, config.search.round_to),
                        config.search.round_to)
        except InvalidTransform as err:
            problems.append(f"{where}: {err}")
    return problems


def _traced_problems(config: JobConfig) -> list[str]:
    """A user's network, traced on the data's shape (unknown before the files are read: checked at run)."""
    from workers.data.datasets import input_shape
    from workers.models.branches import fx_trace_error
    from workers.models.depgraph import removable_units
    from workers.models.user_model import construct

    shape = input_shape(config.dataset)
    if shape is None or not any(c.remove or c.widths for c in config.search.candidates):
        return []
    model = construct(config.teacher.source)
    units = removable_units(model, shape.example(model))
    untraced = fx_trace_error(model) if not units else None
    unit_kind = f"a removable unit of {config.teacher.model}" + (f" (torch.fx cannot trace it: {untraced})"
                                                                    if untraced else "")
    problems, groups = [], {}
    for i, candidate in enumerate(config.search.candidates):
        removed = tuple(candidate.remove)
        if candidate.widths and set(removed) <= set(units) and removed not in groups:
            groups[removed] = teacher_widths(model, removed, shape)
        keys = groups.get(removed, {}) if candidate.widths else {}
        problems.extend(_name_problems(f"search.candidates[{i}]", candidate, (units, unit_kind, "units"),
                                       (keys, "channel group (by its root layer)")))
    return problems


def _name_problems(where: str, candidate: GridCandidate, units: tuple[tuple[str, ...], str, str],
                   keys: tuple[dict[str, int], str]) -> list[str]:
    """A candidate's removals that name no unit, and its widths that name no key or leave its channels.
    `units`: (the names, what one is, what they are called); `keys`: (width key → channels, what one is)."""
    (units, unit_kind, units_label), (keys, key_kind) = units, keys
    problems = []
    for j, name in enumerate(candidate.remove):
        if name not in units:
            problems.append(f"{where}.remove[{j}]: {name!r} is not {unit_kind}{did_you_mean(name, units)}; "
                            f"{_listed(units_label, units)}")
    if len(problems) or not candidate.widths:
        return problems  # widths are known only once every removal is
    for key, width in candidate.widths.items():
        if key not in keys:
            problems.append(f"{where}.widths.{key}: no {key_kind} {key!r}{did_you_mean(key, keys)}; "
                            f"{_listed('keys', keys)}")
        elif not 1 <= width <= keys[key]:
            problems.append(f"{where}.widths.{key}: must be an integer in [1, {keys[key]}] (the teacher's "
                            f"channels), got {width}")
    return problems


def _listed(kind: str, names) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > LISTED else ""
    return f"{kind}: {', '.join(names[:LISTED]) + more}" if names else f"it has no {kind}"
