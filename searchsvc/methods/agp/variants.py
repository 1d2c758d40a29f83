"""The schedule of an `agp` job: read from `search.schedule` (a file or inline), and its Tune variants.

Each combination of `search.tune.final_sparsity` and `search.tune.ending_epoch` is one variant of the
schedule, validated against the teacher's architecture when the config is validated, so a bad value
fails `searchsvc validate` (exit 2) with its key, not a trial an hour later.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from core.records import RecordError
from core.yamlio import load_yaml, read_text
from workers.compression.pruners import StructuredAGP, pruner_classes
from workers.compression.schedule import ScheduleError, parse_schedule
from workers.data.datasets import input_shape
from workers.models.branches import branch_problem
from workers.training.teacher import untrained_network

if TYPE_CHECKING:
    from searchsvc.config import JobConfig
    from searchsvc.methods.agp import AgpSearch


def base_schedule(search: AgpSearch) -> dict[str, Any]:
    """The schedule mapping: the file `search.schedule` names, or the inline mapping itself."""
    if isinstance(search.schedule, dict):
        return copy.deepcopy(search.schedule)
    try:
        raw = load_yaml(read_text(search.schedule))
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise ScheduleError([f"search.schedule: cannot read {search.schedule!r}: {why}"]) from None
    except yaml.YAMLError as err:
        raise ScheduleError([f"search.schedule: {search.schedule}: invalid YAML: {str(err).splitlines()[0]}"]) from None
    return raw


def variant(raw: dict[str, Any], final_sparsity: float | dict[str, float] | None,
            ending_epoch: int | None, where: str = "search.tune", round_to: int | None = None) -> dict[str, Any]:
    """A copy of the schedule with every AGP pruner's final sparsity (a number) or the named ones (a
    mapping) replaced, every pruner policy's ending_epoch replaced, and `round_to` given to every structured
    pruner that names none (so it is part of the stored schedule, and of the candidates' hashes)."""
    out = copy.deepcopy(raw)
    pruners = out.get("pruners") if isinstance(out.get("pruners"), dict) else {}
    for settings in pruners.values():
        structured = isinstance(settings, dict) and pruner_classes().get(settings.get("class")) is StructuredAGP
        if round_to is not None and structured and "round_to" not in settings:
            settings["round_to"] = round_to
    agp = {name: p for name, p in pruners.items() if isinstance(p, dict) and "final_sparsity" in p}
    if isinstance(final_sparsity, dict):
        for name, level in final_sparsity.items():
            if name not in agp:
                raise ScheduleError([f"{where}.final_sparsity.{name}: the schedule has no AGP pruner named {name!r} "
                                     f"(its AGP pruners: {', '.join(sorted(agp)) or 'none'})"])
            agp[name]["final_sparsity"] = level
    elif final_sparsity is not None:
        for settings in agp.values():
            settings["final_sparsity"] = final_sparsity
    if ending_epoch is not None:
        for policy in out.get("policies") or []:
            if isinstance(policy, dict) and "pruner" in policy and "epochs" not in policy:
                policy["ending_epoch"] = ending_epoch
    return out


def schedule_variants(search: AgpSearch, model: nn.Module, example: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Every variant the sweep runs, each {"raw", "schedule" (parsed), "final_sparsity", "ending_epoch"},
    validated against `model` (the teacher's network; `example`: an input of the data's shape, for a user's
    network whose channel groups are traced).

    ScheduleError lists every problem (the base schedule's, then each variant's, by its key).
    """
    raw = base_schedule(search)
    parse_schedule(raw, model, source=f"search.schedule ({_name(search)})", example=example)
    finals = search.tune.final_sparsity or (None,)
    endings = search.tune.ending_epoch or (None,)
    out, problems = [], []
    for (i, final), (j, ending) in itertools.product(enumerate(finals), enumerate(endings)):
        where = f"search.tune (final_sparsity[{i}], ending_epoch[{j}])"
        try:
            changed = variant(raw, final, ending, round_to=search.round_to)
            parsed = parse_schedule(changed, model, source=where, example=example)
        except RecordError as err:
            problems.extend(str(err).splitlines())
            continue
        out.append({"raw": changed, "schedule": parsed, "final_sparsity": final, "ending_epoch": ending})
    if problems:
        raise ScheduleError(sorted(set(problems)))
    return out


def check_agp(config: JobConfig) -> list[str]:
    """Config-time check of an agp job: its schedule and every Tune variant run on the teacher's arch."""
    model = untrained_network(config.teacher)
    shape = input_shape(config.dataset)
    example = shape.example(model) if shape is not None and config.teacher.source is not None else None
    try:
        variants = schedule_variants(config.search, model, example)
    except RecordError as err:
        return str(err).splitlines()
    structured = any(isinstance(p, StructuredAGP) for v in variants for p in v["schedule"].pruners.values())
    problem = branch_problem(model, example) if structured and example is not None else None  # thinned: cut
    return [f"teacher.model: {config.teacher.model} {problem}"] if problem else []


def _name(search: AgpSearch) -> str:
    return search.schedule if isinstance(search.schedule, str) else "inline"


__all__ = ["base_schedule", "check_agp", "schedule_variants", "variant"]
