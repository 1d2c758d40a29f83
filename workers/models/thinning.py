"""Thinning: turn channels that structured pruning zeroed into a physically smaller network.

A *channel group* is what can leave the network as one: the output channels of one or more layers
that every consumer sees together, with every parameter that carries them (conv / linear weight
rows, biases, batch-norm scale and shift). In a ResNet these are surgery's width keys — a block's
inner width (`layer2.1`) or a whole residual stream (`layer2`); in a plain CNN each hidden layer.

A channel is *dead* when every parameter of its group is exactly zero at that channel: then the
layer outputs exactly 0 there (BN gives 0·x̂ + 0), ReLU keeps it 0, and every consumer's input
slice multiplies zeros. Removing dead channels therefore leaves the outputs unchanged (up to float
summation order) while MACs, parameters and latency fall.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from workers.models.cutting import shrink_graph
from workers.models.depgraph import channel_groups as graph_groups
from workers.models.surgery import ScoreTable, prune_groups, shrink
from workers.models.zoo import PlainArch, PlainCNN, build_model

NORMALISED_ACROSS = (nn.LayerNorm, nn.GroupNorm)  # norms whose statistics span the group's channels


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: surgery's width key and the parameters whose dim 0 they index."""

    key: str  # "layer2", "layer2.1" (ResNet) or "conv1", "fc1" (plain CNN)
    weights: tuple[str, ...]  # conv / linear weights whose rows are the channels (what ranks them)
    params: tuple[str, ...]  # every parameter indexed by the channels: weights, biases, BN scale/shift
    slices: int = 1  # equal slices (a grouped conv's groups): a channel goes with its position in every slice


def channel_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[ChannelGroup]:
    """Every prunable group of the model (the classifier's outputs are never one). A user's network (no zoo
    architecture) has the groups of its traced dependency graph, which needs an `example` input."""
    if not hasattr(model, "arch"):
        return _traced_groups(model, example)
    if isinstance(model, PlainCNN):
        names = model.arch.layer_names()[:-1]
        return [ChannelGroup(n, (f"{n}.weight",), (f"{n}.weight", f"{n}.bias")) for n in names]
    groups = []
    for group in prune_groups(model.arch):
        weights = tuple(f"{m}.0.weight" for m in group.members)
        bn = tuple(f"{m}.1.{p}" for m in group.members for p in ("weight", "bias"))
        groups.append(ChannelGroup(group.key, weights, weights + bn))
    return groups


def _traced_groups(model: nn.Module, example: torch.Tensor | None) -> list[ChannelGroup]:
    """Dependency-graph groups as ChannelGroups: the conv / linear weights whose output channels the group
    prunes rank it, and every parameter indexed by those channels (weights, biases, norm scale and shift) is
    masked with them, so a pruned channel outputs exactly zero (as `thin` then requires). Groups a LayerNorm
    or GroupNorm normalises (a transformer's embedding stream, ConvNeXt's stages) are left out: their zero
    channels still move the norm's statistics, so thinning them would change the function; the methods that
    cut and then train (taylor, grid, n2n) prune them."""
    if example is None:
        raise ValueError(f"the channel groups of {type(model).__name__} are traced: an example input is needed")
    groups = []
    for group in graph_groups(model, example):
        if any(isinstance(model.get_submodule(name), NORMALISED_ACROSS) for name in group.outputs):
            continue  # a zero channel still counts in a LayerNorm's mean and variance: removing it is not exact
        weights, params = [], []
        for name in group.outputs:
            module = model.get_submodule(name)
            for pname, p in module.named_parameters(recurse=False):
                if p.shape[0] == group.channels:
                    params.append(f"{name}.{pname}")
                    if pname == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                        weights.append(f"{name}.weight")
        groups.append(ChannelGroup(group.key, tuple(weights), tuple(params), group.slices))
    return groups


def group_of_weight(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, ChannelGroup]:
    """Weight name → its channel group (what a structured pruner naming one weight prunes)."""
    return {w: g for g in channel_groups(model, example) for w in g.weights}


@torch.no_grad()
def alive_channels(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Group key → bool per channel: True where any parameter of the group is non-zero."""
    params = dict(model.named_parameters())
    alive = {}
    for group in channel_groups(model, example):
        flags = [params[p].detach().reshape(params[p].shape[0], -1).ne(0).any(1).cpu() for p in group.params]
        alive[group.key] = torch.stack(flags).any(0)  # a group's root weight is always among its params
    return alive


def thin(model: nn.Module, example: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, int]]:
    """The network without its dead channels (CPU, eval mode), and channels removed per group key.

    Every group keeps at least one channel (a layer cannot vanish); the model itself is unchanged.
    A user's network (no zoo architecture) is thinned through its traced dependency graph, on `example`.
    """
    alive = alive_channels(model, example)
    removed = {key: int((~flags).sum()) for key, flags in alive.items() if not flags.all()}
    if not removed:
        return copy.deepcopy(model).cpu().eval(), {}
    if isinstance(model, PlainCNN):
        return _thin_plain(model, alive), removed
    widths = {key: max(1, int(flags.sum())) for key, flags in alive.items()}
    scores = {key: flags.float() for key, flags in alive.items()}
    if not hasattr(model, "arch"):
        return shrink_graph(model, example, widths=widths, scores=scores), removed
    return shrink(model.cpu(), widths=widths, importance=ScoreTable(model, scores)), removed


@torch.no_grad()
def _thin_plain(model: PlainCNN, alive: dict[str, torch.Tensor]) -> PlainCNN:
    """Keep the live output channels of every hidden layer and the matching inputs of the next."""
    arch: PlainArch = model.arch
    keep = {key: _kept(flags) for key, flags in alive.items()}
    convs = tuple(len(keep[f"conv{i + 1}"]) for i in range(len(arch.convs)))
    fcs = tuple(len(keep[f"fc{i + 1}"]) for i in range(len(arch.fcs)))
    student = build_model(replace(arch, convs=convs, fcs=fcs)).eval()
    inputs = torch.arange(arch.in_channels)
    area = arch.pooled * arch.pooled  # features per channel after the last pool (flatten is channel-major)
    names = arch.layer_names()
    for name in names:
        # every layer's outputs are a group but the classifier's, which keeps all its classes
        outputs = keep[name] if name in keep else torch.arange(arch.num_classes)
        src, dst = getattr(model, name), getattr(student, name)
        if name == "fc1":  # its inputs are the last conv's channels, `area` features each
            inputs = (inputs.view(-1, 1) * area + torch.arange(area)).reshape(-1)
        dst.weight.copy_(src.weight[outputs][:, inputs])
        dst.bias.copy_(src.bias[outputs])
        inputs = outputs
    return student


def _kept(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the live channels, in order; channel 0 if none is live (a layer cannot vanish)."""
    index = flags.nonzero().flatten()
    return index if len(index) else torch.zeros(1, dtype=torch.long)
