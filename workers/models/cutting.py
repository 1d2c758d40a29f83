"""Real surgery on a network the zoo does not describe: the smaller network a candidate names, cut from the teacher.

`shrink_graph` removes the named units — blocks with a skip connection (`depgraph.removable_units`), or single layers
of a network without any (`layer_removal`) — then cuts each channel group to its width, keeping the channels of
largest L1 magnitude in their original order (or of highest score, e.g. Taylor importance), so keeping all
reproduces the teacher exactly. `cut_problem` tries it once before a run. `workers.models.rebuild` makes the same
structure again from the constructor and the stored tensors.
"""

from __future__ import annotations

import copy
from typing import Iterable, Mapping

import torch
from torch import nn

from core.errors import SearchsvcError, first_line
from workers.models.branches import branch_problem
from workers.models.depgraph import ChannelGroup, channel_groups, dependency_graph, prune_groups, removable_units
from workers.models.layer_removal import layer_members, remove_layers
from workers.models.rebuild import (
    LAYERS,
    follow_counts,
    kernel_cuttable,
    own_shapes,
    rebuild_mismatch,
    remove_units,
    set_kernel,
)
from workers.models.surgery import InvalidTransform


def shrink_graph(teacher: nn.Module, example: torch.Tensor, removed: Iterable[str] = (),
                 widths: Mapping[str, int] | Iterable = (), scores: Mapping[str, torch.Tensor] | None = None,
                 kernels: Mapping[str, int] | Iterable = ()) -> nn.Module:
    """The smaller network on the CPU (eval mode), initialised from the teacher's weights; InvalidTransform if
    a unit or width key is unknown or a width is out of range. `scores` (group root → one score per channel,
    e.g. Taylor importance) choose the kept channels instead of their L1 magnitude."""
    model, traced, groups = _without_units(teacher, example, removed)
    _cut_channels(model, traced, groups, _resolve(groups, dict(widths)), scores or {})
    cut_kernels(model, dict(kernels))
    return model


def cut_kernels(model: nn.Module, kernels: Mapping[str, int]) -> nn.Module:
    """Each named conv's kernel cut to its odd size (the N2N paper's shrinkage of a layer's configuration): the
    centre of the teacher's kernel kept, the padding smaller by as much, so the output keeps its size where the
    padding allows. InvalidTransform naming a conv that cannot be cut so."""
    modules = dict(model.named_modules())
    for name, size in kernels.items():
        conv = modules.get(name)
        if not kernel_cuttable(conv):
            raise InvalidTransform(f"kernel of {name}: not a conv with a square, undilated, zero-padded kernel")
        full = conv.kernel_size[0]
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= full or (full - size) % 2:
            raise InvalidTransform(f"kernel of {name} must be odd-centred in [1, {full}], got {size!r}")
        if size == full:
            continue
        trim = (full - size) // 2
        with torch.no_grad():
            conv.weight = nn.Parameter(conv.weight[:, :, trim:trim + size, trim:trim + size].clone())
        set_kernel(conv, (size, size))
    return model


def _without_units(teacher: nn.Module, example: torch.Tensor, removed: Iterable[str],
                   units: tuple[str, ...] | None = None) -> tuple[nn.Module, tuple, list[ChannelGroup]]:
    """A copy of the teacher on the CPU (eval mode) with the named units removed — blocks, or single layers of a
    network without skips, each with its norm (workers.models.layer_removal) — its dependency graph (one graph
    serves the groups and the surgery) and its channel groups. `units`: the teacher's removable blocks when the
    caller has traced them."""
    removed = tuple(removed)
    model = copy.deepcopy(teacher).cpu().eval()
    example = example.cpu()
    units = removable_units(model, example) if units is None else units
    layers = layer_members(model, example) if set(removed) - set(units) else {}
    chosen = [members for name, members in layers.items() if name in removed]
    unknown = sorted(set(removed) - set(units) - {m for members in chosen for m in members})
    if unknown:
        raise InvalidTransform(f"unknown units to remove: {unknown}; removable: {list(units) or list(layers)}")
    apart = [m for members in chosen for m in members if m not in removed]
    if apart:
        raise InvalidTransform(f"{apart[0]} goes with the layer before it: remove both or neither")
    remove_units(model, [name for name in removed if name in units])
    remove_layers(model, chosen, example)
    traced = dependency_graph(model, example)
    return model, traced, channel_groups(model, example, traced)


def _cut_channels(model: nn.Module, traced: tuple, groups: list[ChannelGroup], chosen: Mapping[str, int],
                  scores: Mapping[str, torch.Tensor]) -> None:
    """Cut each chosen group (root → width) of `model` in place; then the counts of the layers Torch-Pruning
    does not keep follow their tensors (VisionTransformer.hidden_dim, head_dim)."""
    from workers.models.custom_layers import head_width, keep_temperature, settle

    if not chosen:
        return
    slices = {g.key: g.slices for g in groups}
    before = own_shapes(model)
    heads = {module: width for module in model.modules() if (width := head_width(module))}
    prune_groups(model, traced, {key: (width, slices[key]) for key, width in chosen.items()}, scores)
    after = own_shapes(model)
    for name, module in model.named_modules():  # Torch-Pruning keeps the counts of the layers it knows
        if not isinstance(module, LAYERS) and after[name] != before[name]:
            follow_counts(module, before[name], after[name])
        settle(module)
    for module, width in heads.items():
        keep_temperature(module, width)


def _resolve(groups: list[ChannelGroup], widths: Mapping[str, int]) -> dict[str, int]:
    """Width keys (a group's root, or any layer whose outputs it prunes) → {root: width}, checked."""
    by_output = {name: group for group in groups for name in group.outputs}
    by_key = {group.key: group for group in groups}
    chosen: dict[str, int] = {}
    for key, width in widths.items():
        group = by_output.get(key)
        if group is None:
            raise InvalidTransform(f"unknown width key {key!r}; keys: {[g.key for g in groups]}")
        if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= group.channels:
            raise InvalidTransform(f"width of {key} must be an integer in [1, {group.channels}], got {width!r}")
        if chosen.get(group.key, width) != width:
            raise InvalidTransform(f"width keys {key!r} and {group.key!r} set one channel group to two widths")
        chosen[group.key] = width
    # a sliced group (grouped convolutions) keeps a multiple of its slices: the nearest, at least one per slice
    chosen = {key: max(by_key[key].slices, round(width / by_key[key].slices) * by_key[key].slices)
              for key, width in chosen.items()}
    return {key: width for key, width in chosen.items() if width < by_key[key].channels}


def cut_problem(model: nn.Module, fresh: nn.Module, example: torch.Tensor) -> str | None:
    """Why searchsvc cannot search over `model` (None: it can), found before a run: its structure is traced,
    its first removable unit removed and every channel group halved, and the result must come back from its
    tensors in `fresh` (a new instance of its constructor) computing the same outputs. One line naming the
    layer or operation that fails."""
    try:
        units = removable_units(model, example)
        branch = None if units else branch_problem(model, example)  # units found: fx traced it
        if branch:
            return branch
        small, traced, groups = _without_units(model, example, units[:1], units)
        halves = {g.key: max(g.slices, g.channels // 2) for g in groups}
        _cut_channels(small, traced, groups, _resolve(groups, halves), {})
    except SearchsvcError as err:  # the caller names teacher.model: said once
        return str(err).removeprefix("teacher.model: ")
    except Exception as err:  # noqa: BLE001 — an operation the tracer or Torch-Pruning cannot follow: one line
        return f"cannot be cut ({type(err).__name__}: {first_line(err)})"
    failing = failing_layer(small, example)
    return failing or rebuild_mismatch(small, fresh, units[:1], example)


def failing_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """None if `model` runs on `example`; else which layer fails, and how (the innermost one still running)."""
    running: list[str] = []

    def enter(name: str):
        def hook(_module: nn.Module, _args: tuple) -> None:
            running.append(name)
        return hook

    def leave(_module: nn.Module, _args: tuple, _output: object) -> None:  # returns None: the output stays
        running.pop()

    layers = [(name, m) for name, m in model.named_modules() if name]
    handles = [m.register_forward_pre_hook(enter(name)) for name, m in layers]
    handles += [m.register_forward_hook(leave) for _, m in layers]
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception as err:  # noqa: BLE001 — whatever the user's layer raises
        where = f"{running[-1]} ({type(model.get_submodule(running[-1])).__name__})" if running else "its forward"
        return f"cannot be cut: cut, {where} fails ({type(err).__name__}: {first_line(err)})"
    finally:
        for handle in handles:
            handle.remove()
    return None
