"""Removing single layers of a network without skip connections (a VGG, AlexNet, a plain CNN or MLP), as the N2N
paper's removal policy acts on every layer of VGG-19.

A *layer* here is a conv (ungrouped) or linear layer other than the last one the forward pass calls (the classifier),
together with the norm called right after it on its output (VGG-BN's BatchNorm): its *members*. Removing it
replaces every member by identity (`rebuild.Skip`); the activation after it stays (ReLU twice is ReLU once).

The layer read `a` channels (features) and wrote `b`. Where they differ, the next layers would now get `a` where they
expect `b`, so before the layer goes, the larger side is cut to the smaller through Torch-Pruning's dependency graph
(the channels of largest L1 magnitude kept, as every cut here): b > a — the layer's own output group (its outputs,
its norm, the inputs of every layer that reads it) down to `a`, so each consumer keeps the teacher's weights of `a`
of its input channels, which now read the removed layer's inputs; a > b — the group that feeds it (the previous
layer's outputs and everything else reading them) down to `b`. Then the layer is square and becomes identity. A
layer whose removal does not give a network that runs on the example input with the same output shape (a strided
conv before a fixed-size flatten, the first layer of a network whose input cannot be cut) is not removable.

`workers.models.rebuild` makes a removed layer again from the stored tensors alone: its members are in the spec's
`removed`, every other layer takes its stored shape.
"""

from __future__ import annotations

import copy
import gc
from typing import Iterable

import torch
from torch import nn

from workers.models.branches import forward_with_hooks
from workers.models.depgraph import PRUNABLE, dependency_graph, module_shapes, prune_groups
from workers.models.rebuild import remove_units
from workers.models.surgery import InvalidTransform

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _widths(layer: nn.Module) -> tuple[int, int]:
    """(channels or features read, written)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def layer_members(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, ...]]:
    """Each conv/linear layer but the classifier (call order) → the modules that go with it: itself and a norm
    called right after it on its output. Grouped and depthwise convs are left out (their channels are tied)."""
    calls: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            calls.append(name)
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    forward_with_hooks(model, example, [m.register_forward_hook(record(n)) for n, m in leaves])
    _, order = module_shapes(model, example)
    modules = dict(model.named_modules())
    members: dict[str, tuple[str, ...]] = {}
    for name in order[:-1]:  # the classifier writes the outputs: never removed
        layer = modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        at = calls.index(name)
        after = calls[at + 1] if at + 1 < len(calls) else None
        norm = after if after is not None and isinstance(modules[after], NORMS) else None
        members[name] = (name, norm) if norm else (name,)
    return members


def remove_layers(model: nn.Module, layers: Iterable[tuple[str, ...]], example: torch.Tensor) -> nn.Module:
    """`model` (in place, on the CPU) with each layer's members (`layer_members`) replaced by identity, the larger of
    its two widths first cut to the smaller (module docstring). InvalidTransform naming the layer if it cannot go."""
    for members in layers:
        name = members[0]
        layer = model.get_submodule(name)
        if not isinstance(layer, PRUNABLE):
            raise InvalidTransform(f"{name} is a {type(layer).__name__}, not a conv or linear layer")
        read, written = _widths(layer)
        if read != written:
            _square(model, name, read, written, example)
        remove_units(model, members)
    return model


def _square(model: nn.Module, name: str, read: int, written: int, example: torch.Tensor) -> None:
    """Cut the wider side of layer `name` to the narrower (its outputs, or the group feeding it)."""
    if written > read:
        prune_groups(model, dependency_graph(model, example), {name: (read, 1)}, {})
        return
    _, order = module_shapes(model, example)
    earlier = order[:order.index(name)]
    feeder = next((key for key in reversed(earlier) if _widths(model.get_submodule(key))[1] == read), None)
    if feeder is None:  # the network's own input feeds it: nothing to cut
        raise InvalidTransform(f"{name} reads {read} channels of the input and writes {written}: it cannot go")
    prune_groups(model, dependency_graph(model, example), {feeder: (written, 1)}, {})


def removable_layers(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[str, ...]]:
    """The layers (`layer_members`) whose removal, tried one at a time on a CPU copy, leaves a network that runs on
    `example` with the same output shape; name → members. `model` itself is left as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _shapes(model(example))
        candidates = layer_members(model, example)
    finally:
        model.train(was_training)
    found: dict[str, tuple[str, ...]] = {}
    for name, members in candidates.items():
        trial = copy.deepcopy(model).cpu().eval()
        try:
            remove_layers(trial, [members], example.cpu())
            with torch.no_grad():
                runs = _shapes(trial(example.cpu())) == expected
        except Exception:  # noqa: BLE001 — a layer whose removal fails, however: not offered
            runs = False
        if runs:
            found[name] = members
        del trial
        gc.collect()  # the dependency graph holds the copy in reference cycles: one copy alive at a time, not all
    return found


def _shapes(outputs: object) -> object:
    if isinstance(outputs, torch.Tensor):
        return tuple(outputs.shape)
    if isinstance(outputs, dict):
        return {k: _shapes(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return tuple(_shapes(v) for v in outputs)
    return type(outputs).__name__
