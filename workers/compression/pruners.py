"""Pruners: what to zero at a given point of a schedule. Each computes masks; the scheduler applies them.

A pruner is a frozen dataclass registered under its Distiller class name; its fields are the keys a
schedule file gives it (validated with their key path). Adding one is one class:

    @register_pruner("MyPruner")
    @dataclass(frozen=True)
    class MyPruner(Pruner):
        weights: tuple[str, ...]
        def masks(self, model, step, groups=None): ...   # parameter name → mask (1 keep, 0 prune), same shape

`groups` (weight name → its channel group, `workers.models.thinning.group_of_weight`) is what a structured
pruner prunes together; the scheduler traces it once for a user's network, which needs an example input.

Sparsity is the fraction of zeros, in [0, 1). Masks are recomputed from the current weights, so a
weight zeroed earlier (its magnitude is now 0) stays among the pruned as sparsity grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
from torch import nn

from core.names import is_number
from workers.compression.importance import l1_importance
from workers.models.surgery import group_scores, round_width
from workers.models.thinning import ChannelGroup, group_of_weight
from workers.models.zoo import weight_layers

Masks = dict[str, torch.Tensor]
Groups = Mapping[str, ChannelGroup]  # weight name → the channel group it belongs to
ANY = "*"  # a thresholds / levels key that stands for every conv and linear weight


@dataclass(frozen=True)
class PolicyStep:
    """Where a pruning policy is: Distiller's `meta` (epochs count from 0)."""

    current: int
    starting: int
    ending: int
    frequency: int


def agp_sparsity(initial: float, final: float, step: PolicyStep) -> float:
    """Zhu & Gupta's cubic schedule, with Distiller's span (so the last pruning epoch reaches `final`):

        s_t = s_f + (s_i − s_f) · (1 − (t − t0) / span)³,   span = ⌊(t_end − t0 − 1) / Δt⌋ · Δt
    """
    span = ((step.ending - step.starting - 1) // step.frequency) * step.frequency
    if span <= 0:  # a one-shot policy: the final sparsity at once
        return final
    progress = min(1.0, max(0.0, (step.current - step.starting) / span))
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_weights(model: nn.Module) -> list[str]:
    """Conv and linear weight names: what element-wise pruning may touch (biases and BN never)."""
    return [f"{name}.weight" for name, _ in weight_layers(model)]


@dataclass(frozen=True)
class Pruner:
    """Base class: `weights` names the parameters (Distiller's `module.` prefix accepted and dropped)."""

    def targets(self) -> tuple[str, ...]:
        """The parameter names the schedule file gave (without `module.`), '*' meaning every weight."""
        return tuple(_strip(w) for w in getattr(self, "weights", ()))

    def masks(self, model: nn.Module, step: PolicyStep, groups: Groups | None = None) -> Masks:
        raise NotImplementedError


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


_PRUNERS: dict[str, type[Pruner]] = {}


def register_pruner(*names: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: the schedule's `class:` values that build this pruner."""
    def add(cls: type[Pruner]) -> type[Pruner]:
        for name in names:
            _PRUNERS[name] = cls
        return cls
    return add


def pruner_classes() -> dict[str, type[Pruner]]:
    return dict(_PRUNERS)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest |w|, zero round(sparsity · n) of them (ties broken by position)."""
    flat = weight.detach().abs().reshape(-1)  # reshape, not view: weights may be channels_last
    prune = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat)
    if prune > 0:
        mask[torch.topk(flat, prune, largest=False).indices] = 0
    return mask.reshape(weight.shape)


@register_pruner("AutomatedGradualPruner")
@dataclass(frozen=True)
class AutomatedGradualPruner(Pruner):
    """Element-wise magnitude pruning to the AGP sparsity of the current epoch, per weight tensor."""

    weights: tuple[str, ...] = field(metadata={"help": "parameter names, e.g. module.conv1.weight"})
    final_sparsity: float = field(metadata={"min": 0, "lt": 1, "help": "sparsity at the ending epoch"})
    initial_sparsity: float = field(default=0.0, metadata={"min": 0, "lt": 1, "help": "sparsity at the start"})

    def __post_init__(self) -> None:
        if self.final_sparsity < self.initial_sparsity:
            raise ValueError(f"final_sparsity: must be at least initial_sparsity ({self.initial_sparsity}), "
                             f"got {self.final_sparsity}")

    def masks(self, model: nn.Module, step: PolicyStep, groups: Groups | None = None) -> Masks:
        target = agp_sparsity(self.initial_sparsity, self.final_sparsity, step)
        params = dict(model.named_parameters())
        return {name: magnitude_mask(params[name], target) for name in self.targets()}


@register_pruner("StructuredAGP", "L1RankedStructureParameterPruner_AGP")
@dataclass(frozen=True)
class StructuredAGP(AutomatedGradualPruner):
    """Whole filters (conv output channels, or linear rows) by the AGP schedule, ranked by L1 norm.

    A filter is pruned with everything that carries its channel — its bias, the batch-norm scale and
    shift after it, and in a ResNet every layer adding into the same residual stream — so a pruned
    channel outputs exactly zero and thinning can remove it.
    """

    group_type: Literal["Filters", "Rows"] = field(default="Filters", metadata={"help": "Filters or Rows"})
    round_to: int = field(default=1, metadata={
        "min": 1, "help": "a group wider than twice this keeps a multiple of it, one wider than this a multiple of "
                "half of it (method agp sets its search.round_to)"})

    def masks(self, model: nn.Module, step: PolicyStep, groups: Groups | None = None) -> Masks:
        sparsity = agp_sparsity(self.initial_sparsity, self.final_sparsity, step)
        return filter_masks(model, self.targets(), sparsity, groups, self.round_to)


def filter_masks(model: nn.Module, weights: tuple[str, ...] | list[str], sparsity: float,
                 groups: Groups | None = None, round_to: int = 1) -> Masks:
    """Masks that zero the `sparsity` share of each named weight's channel group (lowest summed L1 norms),
    over every parameter that carries those channels; the kept count is rounded up to the group's step
    (`surgery.width_step` of its width and `round_to`). `groups`: default, the zoo model's own."""
    groups = group_of_weight(model) if groups is None else groups
    params = dict(model.named_parameters())
    masks: Masks = {}
    for group in {groups[name].key: groups[name] for name in weights}.values():
        keep = channel_keep(group_scores([params[w] for w in group.weights], l1_importance), sparsity, group.slices,
                            round_to)
        for name in group.params:
            shape = (-1,) + (1,) * (params[name].dim() - 1)
            masks[name] = keep.to(params[name].dtype).view(shape).expand_as(params[name]).clone()
    return masks


def channel_keep(scores: torch.Tensor, sparsity: float, slices: int = 1, round_to: int = 1) -> torch.Tensor:
    """Bool per channel: False for the round(sparsity · n) lowest scores; at least one channel kept, rounded up to
    the group's step (`surgery.round_width` of its width and `round_to`). With `slices`
    (grouped convolutions), positions ranked by their mean score go from every slice together."""
    positions = scores.view(slices, -1).mean(0)
    kept = max(1, len(positions) - int(round(sparsity * len(positions))))
    prune = len(positions) - round_width(kept, round_to, len(positions))
    keep = torch.ones(len(positions), dtype=torch.bool, device=scores.device)
    if prune > 0:
        keep[torch.topk(positions, prune, largest=False).indices] = False
    return keep.repeat(slices)


class _PerWeightPruner(Pruner):
    """A one-shot pruner configured by a {parameter name | '*': value} table (its one field)."""

    table_key = ""  # the field holding the table
    rule = ""  # what a valid value is, for the error message
    bounds: tuple[float, float] = (0.0, math.inf)  # a value must lie in [low, high)

    def table(self) -> dict[str, float]:
        return getattr(self, self.table_key)

    def valid(self, value: float) -> bool:
        return self.bounds[0] <= value < self.bounds[1]

    def mask(self, weight: torch.Tensor, value: float) -> torch.Tensor:
        raise NotImplementedError

    def __post_init__(self) -> None:
        for name, value in self.table().items():
            if not is_number(value) or not self.valid(value):
                raise ValueError(f"{self.table_key}.{name}: {self.rule}, got {value}")

    def targets(self) -> tuple[str, ...]:
        return tuple(_strip(k) for k in self.table())

    def masks(self, model: nn.Module, step: PolicyStep, groups: Groups | None = None) -> Masks:
        """Explicit names win over '*', which stands for every conv / linear weight."""
        names = {_strip(k): v for k, v in self.table().items()}
        default = names.pop(ANY, None)
        values = names if default is None else {w: names.get(w, default) for w in prunable_weights(model)}
        params = dict(model.named_parameters())
        return {name: self.mask(params[name], value) for name, value in values.items()}


@register_pruner("SparsityLevelParameterPruner")
@dataclass(frozen=True)
class SparsityLevelParameterPruner(_PerWeightPruner):
    """One-shot magnitude pruning of each weight to its level (`'*'` for every conv / linear weight)."""

    levels: dict[str, float] = field(metadata={"help": "parameter name (or '*') → sparsity in [0, 1)"})
    table_key, rule, bounds = "levels", "a sparsity must be in [0, 1)", (0.0, 1.0)

    def mask(self, weight: torch.Tensor, value: float) -> torch.Tensor:
        return magnitude_mask(weight, value)


@register_pruner("MagnitudeParameterPruner")
@dataclass(frozen=True)
class MagnitudeParameterPruner(_PerWeightPruner):
    """Zero every weight whose magnitude is at most its threshold (`'*'` for every conv / linear weight)."""

    thresholds: dict[str, float] = field(metadata={"help": "parameter name (or '*') → |w| threshold"})
    table_key, rule = "thresholds", "a threshold must be non-negative"

    def mask(self, weight: torch.Tensor, value: float) -> torch.Tensor:
        return (weight.detach().abs() > value).to(weight.dtype)
