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

`shrink_graph` cuts the smaller network (units removed, each group down to its width, keeping the
channels of largest L1 magnitude in their original order, so keeping all reproduces the teacher exactly).
`workers.models.rebuild` makes the same structure again from the constructor and the stored tensors.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import fx, nn

from core.errors import SearchsvcError, first_line
from workers.models.branches import branch_problem, forward_with_hooks
from workers.models.rebuild import LAYERS, follow_counts, own_shapes, rebuild_mismatch, remove_units
from workers.models.surgery import InvalidTransform

log = logging.getLogger(__name__)
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
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
        log.warning("torch.fx cannot trace %s (%s): no block of it can be removed", type(model).__name__,
                    first_line(err))
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


def shrink_graph(teacher: nn.Module, example: torch.Tensor, removed: Iterable[str] = (),
                 widths: Mapping[str, int] | Iterable = (), scores: Mapping[str, torch.Tensor] | None = None,
                 ) -> nn.Module:
    """The smaller network on the CPU (eval mode), initialised from the teacher's weights; InvalidTransform if
    a unit or width key is unknown or a width is out of range. `scores` (group root → one score per channel,
    e.g. Taylor importance) choose the kept channels instead of their L1 magnitude."""
    model, traced, groups = _without_units(teacher, example, removed)
    _cut_channels(model, traced, groups, _resolve(groups, dict(widths)), scores or {})
    return model


def _without_units(teacher: nn.Module, example: torch.Tensor, removed: Iterable[str],
                   units: tuple[str, ...] | None = None) -> tuple[nn.Module, tuple, list[ChannelGroup]]:
    """A copy of the teacher on the CPU (eval mode) with the named units removed, its dependency graph (one
    graph serves the groups and the surgery) and its channel groups. `units`: the teacher's removable units
    when the caller has traced them."""
    removed = tuple(removed)
    model = copy.deepcopy(teacher).cpu().eval()
    example = example.cpu()
    units = removable_units(model, example) if units is None else units
    unknown = sorted(set(removed) - set(units))
    if unknown:
        raise InvalidTransform(f"unknown units to remove: {unknown}; removable: {list(units)}")
    remove_units(model, removed)
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
    _prune(model, traced, {key: (width, slices[key]) for key, width in chosen.items()}, scores)
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


def pruning_group(tp, graph, model: nn.Module, key: str, idxs: Iterable[int] | None = None):
    """The dependency-graph group rooted at layer `key`: its output channels `idxs` (all by default)."""
    root = model.get_submodule(key)
    fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
    return graph.get_pruning_group(root, fn, idxs=list(range(graph.get_out_channels(root))) if idxs is None
                                   else list(idxs))


def _prune(model: nn.Module, traced: tuple, widths: Mapping[str, tuple[int, int]],
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
