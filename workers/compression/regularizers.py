"""Distiller's regularizers: a penalty added to the training loss while their policy is active, and (with
`threshold_criteria`) the groups it drove small zeroed at the end of each such epoch.

    regularizers:
      filters_lasso:
        class: GroupLassoRegularizer
        reg_regims:
          layer1.0.conv1.weight: [0.0008, Filters]   # strength, group type
        threshold_criteria: Mean_Abs                 # optional: zero the groups whose mean |w| < strength
      l1:
        class: L1Regularizer
        reg_regims: {conv1.weight: 0.00002}          # strength
    policies:
      - regularizer: {instance_name: filters_lasso}
        starting_epoch: 0
        ending_epoch: 10
        frequency: 1

Group lasso penalises the sum of the L2 norms of a weight's groups (Yuan & Lin): strength · Σ_g ||w_g||₂,
which drives whole groups — filters (output channels), channels (input channels), rows or columns of a
linear weight — towards zero together: the structure thinning then removes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from core.names import is_number

# Group type → the dimensions a group spans (its norm is taken over them): Distiller's names.
GROUP_DIMS = {"Filters": (1, 2, 3), "Channels": (0, 2, 3), "Rows": (1,), "Cols": (0,)}
Criterion = Literal["Mean_Abs", "Max"]


@dataclass(frozen=True)
class Regularizer:
    """Base class: `reg_regims` maps a weight name (Distiller's `module.` prefix accepted) to its setting."""

    reg_regims: dict[str, Any]
    threshold_criteria: Criterion | None = None

    def targets(self) -> tuple[str, ...]:
        return tuple(_strip(name) for name in self.reg_regims)

    def settings(self) -> dict[str, tuple[float, str | None]]:
        """Weight name → (strength, group type or None for element-wise)."""
        raise NotImplementedError

    def loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The penalty on the current weights (a scalar on their device)."""
        terms = [strength * _group_norms(params[name], group).sum() for name, (strength, group) in
                 self.settings().items()]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def threshold_masks(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With `threshold_criteria`: per weight, a mask that zeros each group (element, for L1) whose mean |w|
        (Mean_Abs) or largest |w| (Max) is below the regularizer's strength; none without it."""
        if self.threshold_criteria is None:
            return {}
        masks = {}
        for name, (strength, group) in self.settings().items():
            magnitude = params[name].detach().abs()
            if group is not None:
                dims = _dims(magnitude, group)
                magnitude = magnitude.mean(dims, keepdim=True) if self.threshold_criteria == "Mean_Abs" else \
                    magnitude.amax(dims, keepdim=True)
            masks[name] = (magnitude >= strength).to(params[name].dtype).expand_as(params[name]).contiguous()
        return masks

    def group_sparsity(self, params: dict[str, torch.Tensor]) -> float:
        """The fraction of this regularizer's groups (elements, for L1) that are exactly zero, 0..1."""
        zero = total = 0
        for name, (_, group) in self.settings().items():
            norms = _group_norms(params[name].detach(), group)
            zero, total = zero + int((norms == 0).sum()), total + norms.numel()
        return zero / total if total else 0.0


@dataclass(frozen=True)
class L1Regularizer(Regularizer):
    """strength · Σ|w| over each named weight: element-wise sparsity."""

    def __post_init__(self) -> None:
        for name, strength in self.reg_regims.items():
            if not is_number(strength) or strength < 0:
                raise ValueError(f"reg_regims.{name}: the strength must be a number >= 0, got {strength!r}")

    def settings(self) -> dict[str, tuple[float, str | None]]:
        return {_strip(name): (float(strength), None) for name, strength in self.reg_regims.items()}


@dataclass(frozen=True)
class GroupLassoRegularizer(Regularizer):
    """strength · Σ_g ||w_g||₂ over each named weight's groups of the given type."""

    def __post_init__(self) -> None:
        for name, regim in self.reg_regims.items():
            if not (isinstance(regim, (list, tuple)) and len(regim) == 2 and is_number(regim[0]) and regim[0] >= 0):
                raise ValueError(f"reg_regims.{name}: expected [strength, group type], e.g. [0.0008, Filters]; "
                                 f"got {regim!r}")
            if regim[1] not in GROUP_DIMS:
                raise ValueError(f"reg_regims.{name}: group type {regim[1]!r} is not supported; supported: "
                                 f"{', '.join(GROUP_DIMS)}")

    def settings(self) -> dict[str, tuple[float, str | None]]:
        return {_strip(name): (float(regim[0]), str(regim[1])) for name, regim in self.reg_regims.items()}


REGULARIZERS: dict[str, type[Regularizer]] = {"L1Regularizer": L1Regularizer,
                                              "GroupLassoRegularizer": GroupLassoRegularizer}


def shape_problems(where: str, regularizer: Regularizer, model: nn.Module) -> list[str]:
    """Weights the model lacks, or whose shape the group type does not fit (Filters and Channels on a conv
    weight, Rows and Cols on a linear one)."""
    params, problems = dict(model.named_parameters()), []
    for name, (_, group) in regularizer.settings().items():
        if name not in params:
            problems.append(f"{where}.reg_regims.{name}: the model has no such weight")
        elif group is not None and max(GROUP_DIMS[group]) >= params[name].dim():
            problems.append(f"{where}.reg_regims.{name}: group type {group} needs a "
                            f"{'conv' if group in ('Filters', 'Channels') else 'linear'} weight; it has shape "
                            f"{tuple(params[name].shape)}")
    return problems


def _group_norms(weight: torch.Tensor, group: str | None) -> torch.Tensor:
    """|w| element-wise (L1), or the L2 norm of each group."""
    if group is None:
        return weight.abs()
    # vector_norm's gradient at a zero group is 0 (a hand-written sqrt would give NaN once a group is zeroed)
    return torch.linalg.vector_norm(weight, dim=_dims(weight, group))


def _dims(weight: torch.Tensor, group: str) -> tuple[int, ...]:
    """The dimensions a group spans, for a weight of this rank (a Filters group of a linear weight: its row)."""
    return tuple(d for d in GROUP_DIMS[group] if d < weight.dim())


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name
