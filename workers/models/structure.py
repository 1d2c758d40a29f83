"""What a search acts on in any teacher — the zoo's own models or a user's network — in one shape.

    units = structure_of(teacher, inputs)
    units.names        # blocks removal may replace by identity, forward order
    units.rows[name]   # the block's layer descriptor (the N2N agent's observation row)
    units.inner[name]  # width key → channels inside the block (what the shrink stage scales)
    units.members[name]   # a layer unit's modules (the layer, its norm): what a candidate's `removed` lists
    units.kernels[name]   # a conv layer unit's kernel size (what the shrink stage may cut too)

A zoo model describes itself (`ResNet.describe`, `surgery.width_keys`); a user's network is traced
(`workers.models.depgraph`): its blocks with a skip connection, or — a network with none (VGG, AlexNet, a plain
CNN) — its single layers (`workers.models.layer_removal`: a conv or linear layer with the norm after it). The
search code above this module cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from workers.models.cutting import shrink_graph
from workers.models.depgraph import ChannelGroup, channel_groups, module_shapes, removable_units
from workers.models.inputs import InputSpec
from workers.models.layer_removal import removable_layers
from workers.models.rebuild import kernel_cuttable
from workers.models.surgery import removable_blocks, width_keys
from workers.models.zoo import LayerDescriptor, LayerType


@dataclass(frozen=True)
class Units:
    """The removable blocks of a teacher, their descriptors and their inner widths."""

    names: tuple[str, ...]
    rows: dict[str, LayerDescriptor]
    inner: dict[str, dict[str, int]]
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a layer unit → its modules (layer, norm)
    kernels: dict[str, int] = field(default_factory=dict)  # a conv layer unit → its kernel size, where above 1


def structure_of(teacher: nn.Module, inputs: InputSpec) -> Units:
    """The teacher's removable blocks as data (zoo: as it describes itself; any other network: traced)."""
    if hasattr(teacher, "describe"):
        names = removable_blocks(teacher)
        widths = width_keys(teacher.arch)
        return Units(names, {d.name: d for d in teacher.describe()}, {n: {n: widths[n]} for n in names})
    example = inputs.example(teacher)
    names = removable_units(teacher, example)
    groups = channel_groups(teacher, example)
    shapes, _ = module_shapes(teacher, example)
    if not names:
        return _layers(teacher, example, groups)
    inner = {name: {g.key: g.channels for g in groups if all(o.startswith(name + ".") for o in g.outputs)}
             for name in names}
    rows = {n: _descriptor(teacher, n, i, shapes[n][1][1]) for i, n in enumerate(names)}
    return Units(names, rows, inner)


def widths_after(teacher: nn.Module, inputs: InputSpec, removed: tuple[str, ...], inner: dict[str, dict[str, int]]
                 ) -> dict[str, dict[str, int]]:
    """`inner` (unit → width key → the teacher's channels) as the network with `removed` gone has them: removing a
    single layer cuts a neighbour's group to its own narrower side (workers.models.layer_removal), so a kept unit
    may start narrower than in the teacher. A zoo model's removals change no other width."""
    if hasattr(teacher, "describe") or not removed:
        return inner
    example = inputs.example(teacher)
    now = {g.key: g.channels for g in channel_groups(shrink_graph(teacher, example, removed), example.cpu())}
    return {unit: {key: min(channels, now.get(key, channels)) for key, channels in widths.items()}
            for unit, widths in inner.items()}


def _layers(teacher: nn.Module, example: torch.Tensor, groups: list[ChannelGroup]) -> Units:
    """A network with no block to remove: its removable single layers, each also shrunk by its own width."""
    members = removable_layers(teacher, example)
    names = tuple(members)
    widths = {g.key: g.channels for g in groups}
    inner = {name: {name: widths[name]} if name in widths else {} for name in names}
    rows = {name: _layer_descriptor(teacher.get_submodule(name), name, i) for i, name in enumerate(names)}
    convs = {name: teacher.get_submodule(name) for name in names}
    kernels = {name: conv.kernel_size[0] for name, conv in convs.items()
               if kernel_cuttable(conv) and conv.kernel_size[0] > 1}
    return Units(names, rows, inner, members, kernels)


def _layer_descriptor(layer: nn.Module, name: str, index: int) -> LayerDescriptor:
    """A conv or linear layer as the paper's agent sees it: position, kind, filters, kernel, stride, padding,
    bytes of its fp32 parameters."""
    memory = 4 * sum(p.numel() for p in layer.parameters())
    if isinstance(layer, nn.Conv2d):
        padding = layer.padding[0] if isinstance(layer.padding, tuple) else 0  # "same": counted as 0
        return LayerDescriptor(name, index, index + 1, LayerType.CONV, layer.out_channels, layer.kernel_size[0],
                               layer.stride[0], padding, memory, True)
    return LayerDescriptor(name, index, index + 1, LayerType.LINEAR, layer.out_features, 1, 1, 0, memory, True)


def _descriptor(teacher: nn.Module, name: str, index: int, channels: int) -> LayerDescriptor:
    """A traced block as the agent sees a zoo block: position, channels out, its largest kernel, bytes."""
    block = teacher.get_submodule(name)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    kernel = max((m.kernel_size[0] for m in convs), default=1)
    memory = 4 * sum(p.numel() for p in block.parameters())  # bytes of fp32 parameters
    return LayerDescriptor(name, index, index + 1, LayerType.BLOCK, channels, kernel, 1, kernel // 2, memory, True)
