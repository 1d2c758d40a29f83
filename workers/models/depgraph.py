"""Structure read from a network the zoo does not describe, and real surgery on it.

A user's network (a torchvision model, or their own factory) comes with no architecture record, so its
structure is read from the model itself:
- `removable_units`: blocks with a skip connection whose input and output shapes match, found by tracing
  (torch.fx: an addition inside the block, one of whose operands comes from outside it and the other is
  computed from it), not by class name; removing one leaves the skip alone, i.e. the block becomes an
  identity. ResNet blocks, MobileNet's inverted residuals, ConvNeXt blocks, transformer encoder blocks.
- `channel_groups`: the channels that must be pruned together (residual additions, depthwise convolutions,
  concatenations, a transformer's embedding stream with its class token and position embeddings), from
  Torch-Pruning's DependencyGraph. A group is named by its root module: the first conv or linear whose
  output channels it prunes (`layer1.0.conv1`, `features.2.conv.0.0`). A group that feeds grouped
  convolutions or attention heads has `slices`: the same positions leave every group or head, so `groups`
  and `num_heads` stay and each head narrows (`workers.models.custom_layers` says why for attention).

`prune_groups` cuts groups to their widths through the graph; `workers.models.cutting` builds a candidate with it.
"""

from __future__ import annotations

import logging
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import fx, nn

from core.errors import SearchsvcError, first_line
from workers.models.branches import forward_with_hooks

log = logging.getLogger(__name__)
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_UNTRACEABLE: set[str] = set()  # model classes whose trace failure was logged as a warning
PRUNABLE = (nn.Conv2d, nn.Linear)  # root layers of a channel group


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: named by the root module, with the width it has now."""

    key: str  # the root module's name
    channels: int
    outputs: tuple[str, ...]  # modules whose output channels the group prunes (the root among them)
    slices: int = 1  # equal slices the channels fall into (a grouped conv's groups): the same positions leave each


def module_shapes(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, tuple], list[str]]:
    """Each module's (input shape, output shape) on `example`, and the conv/linear layers in call order."""
    shapes: dict[str, tuple] = {}
    order: list[str] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes[name] = (tuple(args[0].shape), tuple(output.shape))
            if isinstance(module, PRUNABLE) and name not in order:
                order.append(name)
        return record

    forward_with_hooks(model, example, [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n])
    return shapes, order


def classifier(model: nn.Module, example: torch.Tensor) -> str:
    """The last conv or linear layer the forward pass calls: its outputs are the logits, never pruned."""
    return module_shapes(model, example)[1][-1]


def removable_units(model: nn.Module, example: torch.Tensor) -> tuple[str, ...]:
    """Names of the blocks that removal may replace by identity, in forward order (none if fx cannot trace)."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 — data-dependent control flow and the like: no units, said once
        name = type(model).__name__  # every candidate build traces its teacher again: warned once per process
        log.log(logging.DEBUG if name in _UNTRACEABLE else logging.WARNING,
                "torch.fx cannot trace %s (%s): no block of it can be removed", name, first_line(err))
        _UNTRACEABLE.add(name)
        return ()
    shapes, _ = module_shapes(model, example)
    modules = dict(traced.named_modules())
    units: list[str] = []
    for node in traced.graph.nodes:
        unit = _skip_unit(node, shapes, modules)
        if unit is not None and unit not in units:
            units.append(unit)
    return tuple(units)


def _scopes(node: fx.Node) -> list[str]:
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def _through_identity(node: fx.Node, modules: Mapping[str, nn.Module]) -> fx.Node:
    """The value an `nn.Identity` call passes on (a shortcut written as `self.shortcut = nn.Identity()`)."""
    while node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Identity) and node.args:
        node = node.args[0]
    return node


def _skip_unit(node: fx.Node, shapes: Mapping[str, tuple], modules: Mapping[str, nn.Module]) -> str | None:
    """The innermost module around an addition that adds its own input to what it computed, if its
    input and output shapes match."""
    if node.op not in ("call_function", "call_method") or node.target not in _ADDS:
        return None
    operands = [_through_identity(a, modules) for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    for scope in reversed(_scopes(node)):  # innermost first
        inside = [scope in _scopes(a) for a in operands]
        if inside.count(True) == 1 and scope in shapes:
            if not _depends_on(operands[inside.index(True)], operands[inside.index(False)]):
                return None  # a constant added (ViT's position embeddings): not a branch beside a skip
            shape_in, shape_out = shapes[scope]
            return scope if shape_in == shape_out else None
    return None


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    """Whether `source` is among the nodes `node` is computed from."""
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current is source:
            return True
        if current not in seen:
            seen.add(current)
            todo.extend(current.all_input_nodes)
    return False


def dependency_graph(model: nn.Module, example: torch.Tensor):
    """(the torch_pruning module, its DependencyGraph of `model`) — imported where a user's model is cut."""
    import torch_pruning as tp

    from workers.models.custom_layers import customized_pruners, traceable, unfollowable  # imports torch_pruning

    pruners = customized_pruners()
    unsupported = unfollowable(model)
    if unsupported:
        raise SearchsvcError(f"teacher.model: {type(model).__name__} is not supported yet: {unsupported}")
    try:
        with torch.enable_grad(), traceable(model), warnings.catch_warnings():  # traced through autograd
            # what it calls unwrapped now are scalars (timm's StarReLU scale), which it leaves alone: no warning
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            return tp, tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=pruners,
                unwrapped_parameters=_unwrapped(tp, model, tuple(pruners)))
    except Exception as err:  # noqa: BLE001 — an operation Torch-Pruning cannot follow: one line naming it
        raise SearchsvcError(f"teacher.model: Torch-Pruning cannot build the dependency graph of "
                             f"{type(model).__name__} ({type(err).__name__}: {first_line(err)})") from None


def _unwrapped(tp, model: nn.Module, customized: tuple[type, ...]) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside every layer Torch-Pruning knows (a class token, position embeddings, a layer scale),
    each with its channel dimension: the last one wider than 1, which is where the channels are in every layout
    torchvision uses ((1, 1, D) token, (1, N, D) positions, (C, 1, 1) scale). Scalars have no channels."""
    known = tp.pruner.function.PrunerBox
    wrapped = {id(p) for m in model.modules() if type(m) in customized or (
        tp.ops.module2type(m) in known and tp.ops.module2type(m) != tp.ops.OPTYPE.ELEMENTWISE) for p in m.parameters()}
    found = []
    for param in model.parameters():
        wide = [i for i, size in enumerate(param.shape) if size > 1]
        if id(param) not in wrapped and wide:
            found.append((param, wide[-1]))
    return found


def channel_groups(model: nn.Module, example: torch.Tensor, traced: tuple | None = None) -> list[ChannelGroup]:
    """Every prunable channel group of `model` in forward order (the classifier's outputs excluded). `traced`:
    `dependency_graph(model, example)` when the caller has it (a graph costs a trace of the whole model)."""
    from workers.models.custom_layers import ShuffleBarrier, qkv_slices

    _, graph = traced or dependency_graph(model, example)
    attention = qkv_slices(model)
    names = {module: name for name, module in model.named_modules()}
    last = model.get_submodule(classifier(model, example))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = []
    for group in graph.get_all_groups(ignored_layers=[last], root_module_types=PRUNABLE):
        if any(isinstance(item.dep.target.module, ShuffleBarrier) for item in group):
            continue  # channels a shuffle interleaves keep their width (workers.models.custom_layers)
        root = group[0].dep.target.module
        channels = graph.get_out_channels(root)
        outputs = {names[item.dep.target.module] for item in group
                   if item.dep.target.module in names and graph.is_out_channel_pruning_fn(item.dep.handler)}
        slices = _slices(graph, group, attention)
        if channels % slices:
            continue  # slices of unequal size cannot keep the same positions: the group keeps its width
        groups.append(ChannelGroup(names[root], channels, tuple(sorted(outputs, key=order.__getitem__)), slices))
    return sorted(groups, key=lambda g: order[g.key])


def _slices(graph, group, attention: Mapping[nn.Module, int]) -> int:
    """The equal slices a group's channels fall into: the groups of a grouped (not depthwise) convolution or of
    a GroupNorm it touches (ResNeXt, RegNet), the heads of an attention layer it feeds, 1 otherwise. Pruning the
    same positions from every slice keeps `groups` (and heads) and each one's channels together; Torch-Pruning's
    surgery relies on that for grouped inputs."""
    slices = 1
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or (isinstance(module, nn.Conv2d) and module.groups == module.out_channels):
            continue  # depthwise convolutions follow their channels one by one
        if isinstance(module, nn.MultiheadAttention):
            count = module.num_heads  # each head keeps its own channels: the same positions go from every head
        elif module in attention and graph.is_out_channel_pruning_fn(handler):
            count = attention[module]  # q, k and v of every head (custom_layers.qkv_slices)
        else:
            count = (pruner.get_out_channel_groups(module) if graph.is_out_channel_pruning_fn(handler)
                     else pruner.get_in_channel_groups(module))
        slices = math.lcm(slices, int(count))  # positions the same in every slice of each kind
    return slices


def slice_positions(score: torch.Tensor, width: int, slices: int = 1) -> list[int]:
    """The channels to keep, in order: the `width` of highest score, or with `slices`, the `width // slices`
    positions of highest mean score across the slices, kept in every slice."""
    per = len(score) // slices
    kept = torch.topk(score.float().cpu().view(slices, per).mean(0), width // slices).indices.tolist()
    return sorted(s * per + p for s in range(slices) for p in kept)


def pruning_group(tp, graph, model: nn.Module, key: str, idxs: Iterable[int] | None = None):
    """The dependency-graph group rooted at layer `key`: its output channels `idxs` (all by default)."""
    root = model.get_submodule(key)
    fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
    return graph.get_pruning_group(root, fn, idxs=list(range(graph.get_out_channels(root))) if idxs is None
                                   else list(idxs))


def prune_groups(model: nn.Module, traced: tuple, widths: Mapping[str, tuple[int, int]],
           scores: Mapping[str, torch.Tensor]) -> None:
    """Prune each group rooted at a key down to its (width, slices), keeping the channels of highest score
    (default: the group's L1 magnitude), through `traced` = (torch_pruning, the model's graph); the weights
    change under no_grad."""
    tp, graph = traced
    magnitude = tp.importance.GroupMagnitudeImportance(p=1)
    with torch.no_grad():
        for key, (width, slices) in widths.items():
            score = scores[key] if key in scores else magnitude(pruning_group(tp, graph, model, key))
            keep = set(slice_positions(score, width, slices))
            pruning_group(tp, graph, model, key, [i for i in range(len(score)) if i not in keep]).prune()
