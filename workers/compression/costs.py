"""What a channel of each group costs in a counted quantity (MACs or parameters), and how a model is counted.

The cost of a group is the drop in MACs (or parameters) that cutting one of its positions gives, summed over
every layer the group touches: the output rows of the layers whose outputs it prunes, the input columns of
the layers reading it, their norms and biases, and inside attention the q, k, v products. It is measured by
cutting, so it holds for every layer Torch-Pruning and our own pruners know, attention and depthwise
convolutions included: a zoo network is rebuilt from its architecture with the group one channel narrower
(no weights copied); a user's network is cut through its dependency graph (about 0.1 s per group on a CPU for
a ResNet-18). A model's cost is counted the way its measurement is (`count_macs`, `count_parameters`).

A budget names quantities and a step needs one (`searchsvc.budget.Budget.cost`): MACs and parameters stand for
themselves, latency for MACs (what a forward pass computes; a measured per-layer latency table is not built yet),
bytes for parameters (what a saved model holds).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from workers.measurement.measure import count_macs, count_parameters
from workers.models.depgraph import channel_groups, shrink_graph
from workers.models.inputs import InputSpec
from workers.models.surgery import derive_arch, prune_groups, width_keys
from workers.models.zoo import build_model


def counter(quantity: str, inputs: InputSpec) -> Callable[[nn.Module], int]:
    """The function that counts `quantity` (macs or params) of a model on this input."""
    if quantity == "macs":
        return lambda model: count_macs(model, inputs)
    if quantity == "params":
        return count_parameters
    raise ValueError(f"cost: macs or params, got {quantity!r}")


def group_costs(model: nn.Module, quantity: str, inputs: InputSpec) -> dict[str, float]:
    """Group key → the drop in `quantity` from cutting one position of the group (a group down to one position
    costs nothing more to keep: it is left out)."""
    count = counter(quantity, inputs)
    whole = count(model)
    costs: dict[str, float] = {}
    if hasattr(model, "arch"):
        widths = width_keys(model.arch)
        for group in prune_groups(model.arch):
            if widths[group.key] > 1:
                narrower = build_model(derive_arch(model.arch, widths={group.key: widths[group.key] - 1}))
                costs[group.key] = float(whole - count(narrower))
        return costs
    example = inputs.example(model)
    for group in channel_groups(model, example):
        if group.channels > group.slices:
            narrower = shrink_graph(model, example, widths={group.key: group.channels - group.slices})
            costs[group.key] = float(whole - count(narrower))
    return costs
