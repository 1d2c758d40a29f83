"""What a channel of each group costs in a budgeted quantity (MACs, parameters or latency), and how a model is
counted in it.

The cost of a group is the drop in the quantity that cutting its positions gives, per position, summed over every
layer the group touches: the output rows of the layers whose outputs it prunes, the input columns of the layers
reading it, their norms and biases, and inside attention the q, k, v products. It is measured by cutting, so it
holds for every layer Torch-Pruning and our own pruners know, attention and depthwise convolutions included: a zoo
network is rebuilt from its architecture with the group narrower (no weights copied); a user's network is cut
through its dependency graph (about 0.1 s per group on a CPU for a ResNet-18). MACs and parameters are counted the
way a candidate's measurement counts them (`count_macs`, `count_parameters`); latency is priced by a per-layer
table on the budget's backend (workers.compression.latency_table), one chunk of the group at a time (a channel
alone saves nothing where kernels compute channels in blocks).

A budget names quantities and a step needs one (`searchsvc.budget.Budget.cost`): MACs and parameters stand for
themselves, a latency limit for its own probe's latency (or the int8 model's), bytes for parameters (what a saved
model holds).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from workers.compression.latency_table import LatencyCounter
from workers.measurement.latency import LatencyCost
from workers.measurement.measure import count_macs, count_parameters
from workers.models.cutting import shrink_graph
from workers.models.depgraph import channel_groups
from workers.models.inputs import InputSpec
from workers.models.surgery import derive_arch, prune_groups, width_keys
from workers.models.zoo import build_model

Counter = Callable[[nn.Module], float]


def counter(quantity: str, inputs: InputSpec, parent: nn.Module | None = None,
            device: torch.device | None = None) -> Counter:
    """The function that counts `quantity` of a model on this input: macs, params, or a latency cost's name
    (`LatencyCost.name`), predicted from `parent`'s measured latency on `device` (the CPU by default)."""
    if quantity == "macs":
        return lambda model: count_macs(model, inputs)
    if quantity == "params":
        return count_parameters
    latency = LatencyCost.parse(quantity)
    if latency is None or parent is None:
        raise ValueError(f"cost: macs, params or a latency probe's column with its parent model, got {quantity!r}")
    return LatencyCounter(parent, latency, inputs, device or torch.device("cpu"))


def group_costs(model: nn.Module, quantity: str, inputs: InputSpec, steps: Mapping[str, int] | None = None,
                count: Counter | None = None) -> dict[str, float]:
    """Group key → the drop in `quantity` per position from cutting `steps[key]` positions of the group (default
    one; a group down to that many costs nothing more to keep: it is left out). `count`: a counter of the quantity
    already made for this model (a latency counter's table is shared with the step's landing)."""
    count = count or counter(quantity, inputs, model)
    whole = count(model)
    costs: dict[str, float] = {}
    if hasattr(model, "arch"):
        widths = width_keys(model.arch)
        for group in prune_groups(model.arch):
            cut = (steps or {}).get(group.key, 1)
            if widths[group.key] > cut:
                narrower = build_model(derive_arch(model.arch, widths={group.key: widths[group.key] - cut}))
                costs[group.key] = max(0.0, float(whole - count(narrower))) / cut  # timing noise: never below 0
        return costs
    example = inputs.example(model)
    for group in channel_groups(model, example):
        cut = (steps or {}).get(group.key, 1) * group.slices
        if group.channels > cut:
            narrower = shrink_graph(model, example, widths={group.key: group.channels - cut})
            costs[group.key] = max(0.0, float(whole - count(narrower))) / cut * group.slices
    return costs
