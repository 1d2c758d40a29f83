"""Which weights a sensitivity analysis prunes one at a time (checked at validate, used by the driver)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from core.errors import SearchsvcError
from core.names import did_you_mean
from workers.compression.pruners import prunable_weights
from workers.models.thinning import channel_groups

if TYPE_CHECKING:
    from searchsvc.methods.sensitivity import SensitivitySearch


def analysed_weights(model: nn.Module, search: SensitivitySearch, example: torch.Tensor | None = None) -> list[str]:
    """The weights to prune one at a time: as configured, else every conv / linear weight (element) or
    one weight per channel group (filter: pruning it prunes the group; a user's network's groups are traced
    on `example`)."""
    if search.structure == "element":
        every = default = prunable_weights(model)
    else:
        groups = channel_groups(model, example)
        every, default = [w for g in groups for w in g.weights], [g.weights[0] for g in groups]
    for i, name in enumerate(search.weights):
        if name not in every:
            model_name = model.arch.name if hasattr(model, "arch") else type(model).__name__
            raise SearchsvcError(f"search.weights[{i}]: {name!r} is not a prunable weight of {model_name} "
                                 f"({search.structure} structure){did_you_mean(name, every)}")
    return list(search.weights) or default
