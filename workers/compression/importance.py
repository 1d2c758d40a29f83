"""Filter importance criteria: plain functions from a conv weight [out, in, k, k] to one score per filter.

Surgery asks an importance function which channels to keep; methods choose the function. Weights
may be channels_last, so everything flattens with `flatten` / `reshape`, never `view`.
"""

from __future__ import annotations

from typing import Callable

import torch

from core.names import lookup

Importance = Callable[[torch.Tensor], torch.Tensor]


def l1_importance(weight: torch.Tensor) -> torch.Tensor:
    """Sum of absolute weights of each output filter (Li et al., 'Pruning Filters for Efficient ConvNets')."""
    return weight.detach().abs().flatten(1).sum(1)


def l2_importance(weight: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each output filter."""
    return weight.detach().flatten(1).norm(dim=1)


IMPORTANCE: dict[str, Importance] = {"l1": l1_importance, "l2": l2_importance}


def get_importance(name: str) -> Importance:
    """The importance function registered as `name`."""
    return lookup(IMPORTANCE, name, "importance")
