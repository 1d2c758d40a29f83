"""Surgery: a real, smaller `nn.Module` from a teacher — blocks removed, widths shrunk, weights inherited.

Two kinds of width, named as in the module tree:
- a block's inner width, key `layer2.1`: the output channels of its first conv (free to shrink);
- a residual stream, key `layer2`: the channels shared by every tensor joined by identity shortcuts
  (the stem and all of stage 1 are one stream in a CIFAR ResNet). Its channels are ranked as a group
  (summed, per-member normalised importance) and removed together, so additions stay aligned.

Kept channels stay in their original order, so keeping every channel reproduces the teacher exactly.
A removed block keeps only its shortcut: identity, or the teacher's 1x1 projection where the block
changed stride or width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

import torch
from torch import nn

from core.names import is_int
from workers.compression.importance import Importance, l1_importance
from workers.models.zoo import BasicBlock, BlockArch, LayerType, ResNet, ResNetArch, build_model, with_blocks


class InvalidTransform(ValueError):
    """A transformation that cannot give a valid network: the candidate is a result with status invalid."""


@dataclass(frozen=True)
class Streams:
    """The residual streams of an architecture: key → names of the layers whose outputs it joins."""

    producers: dict[str, tuple[str, ...]]  # e.g. "layer1" → ("stem", "layer1.0", "layer1.1", "layer1.2")
    of_output: dict[str, str]  # producer name ("stem" or a block) → its stream key


def streams(arch: ResNetArch) -> Streams:
    """Group the stem and block outputs into streams joined by identity shortcuts."""
    members: dict[str, list[str]] = {"stem": ["stem"]}
    of_output, current = {"stem": "stem"}, "stem"
    for name, block, cin in arch.block_inputs():
        if block.needs_projection(cin):  # a new stream starts here
            current = name.split(".")[0] if name.split(".")[0] not in members else name
            members[current] = []
        members[current].append(name)
        of_output[name] = current
    if len(members["stem"]) > 1:  # the stem shares its stream with stage 1: call it by the stage
        first = members["stem"][1].split(".")[0]
        members[first] = members.pop("stem")
        of_output = {k: first if v == "stem" else v for k, v in of_output.items()}
    return Streams({k: tuple(v) for k, v in members.items()}, of_output)


def width_keys(arch: ResNetArch) -> dict[str, int]:
    """Every width a transformation may set, with the teacher's value: streams and block inner widths."""
    keys = {key: _stream_width(arch, key, streams(arch)) for key in streams(arch).producers}
    keys.update({name: block.mid for name, block in arch.blocks() if not block.removed})
    return keys


def _stream_width(arch: ResNetArch, key: str, groups: Streams) -> int:
    first = groups.producers[key][0]
    return arch.stem if first == "stem" else dict(arch.blocks())[first].out


def width_step(full: int, multiple: int) -> int:
    """The multiple a group the teacher has `full` channels wide keeps: `multiple` where it is wider than twice
    that, half of it where it is wider than `multiple` (a 16-wide group keeps 4, 8 or 12 channels), else any count.
    int8 and bf16 kernels work on 4 to 16 channels at once: on the CPU, a ResNet-20 whose 16-wide first stage kept
    5 to 10 channels gained 1.22x from int8 where one with whole widths gained 1.52x (benchmarks/README.md)."""
    if multiple > 1 and full > 2 * multiple:
        return multiple
    return multiple // 2 if multiple // 2 > 1 and full > multiple else 1


def round_width(width: int, multiple: int, limit: int) -> int:
    """Round up to the group's step (`width_step` of the teacher's `limit` channels and `multiple`), at least one
    step, never above the teacher's width."""
    step = width_step(limit, multiple)
    return min(limit, max(step, int(math.ceil(width / step)) * step)) if step > 1 else width


def derive_arch(arch: ResNetArch, removed: Iterable[str] = (), widths: Mapping[str, int] | Iterable = (),
                round_to: int = 1) -> ResNetArch:
    """The architecture after removing blocks and setting widths; InvalidTransform if it cannot exist."""
    removed, widths = set(removed), dict(widths)
    names = set(arch.block_names())
    if removed - names:
        raise InvalidTransform(f"unknown blocks to remove: {sorted(removed - names)}; blocks: {sorted(names)}")
    allowed = width_keys(arch)
    for key, width in widths.items():
        if key not in allowed:
            raise InvalidTransform(f"unknown width key {key!r}; keys: {sorted(allowed)}")
        if not is_int(width) or not 1 <= width <= allowed[key]:
            raise InvalidTransform(f"width of {key} must be an integer in [1, {allowed[key]}], got {width!r}")
    final = {k: round_width(w, round_to, allowed[k]) for k, w in widths.items()}
    groups = streams(arch)
    stream = {key: final.get(key, allowed[key]) for key in groups.producers}

    def change(name: str, block: BlockArch) -> BlockArch:
        return replace(block, mid=final.get(name, block.mid), out=stream[groups.of_output[name]],
                       removed=block.removed or name in removed)

    derived = replace(with_blocks(arch, change), stem=stream[groups.of_output["stem"]])
    if streams(derived).of_output != groups.of_output:
        raise InvalidTransform("these widths would merge two residual streams (a projection would vanish)")
    return derived


@dataclass(frozen=True)
class PruneGroup:
    """Channels removed together: a width key of surgery and the conv-bn outputs that carry them."""

    key: str  # "layer2" (a residual stream) or "layer2.1" (a block's inner width)
    members: tuple[str, ...]  # module names of nn.Sequential(conv, bn): "stem", "layer2.0.shortcut", ...


def prune_groups(arch: ResNetArch) -> list[PruneGroup]:
    """Every prunable group of a network: its streams, then the inner width of each kept block."""
    blocks = dict(arch.blocks())
    projected = {name for name, block, cin in arch.block_inputs() if block.needs_projection(cin)}
    groups = []
    for key, producers in streams(arch).producers.items():
        members: list[str] = []
        for producer in producers:
            if producer == "stem":
                members.append("stem")
                continue
            block = blocks[producer]
            if producer in projected:
                members.append(f"{producer}.shortcut")
            if not block.removed:
                members.append(f"{producer}.conv2")
        groups.append(PruneGroup(key, tuple(members)))
    groups += [PruneGroup(name, (f"{name}.conv1",)) for name, block in arch.blocks() if not block.removed]
    return groups


class ScoreTable:
    """Surgery's importance interface (conv weight → score per filter) over precomputed group scores."""

    def __init__(self, model: ResNet, scores: Mapping[str, torch.Tensor]) -> None:
        self._by_weight = {id(model.get_submodule(m)[0].weight): scores[g.key]
                           for g in prune_groups(model.arch) for m in g.members}

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self._by_weight[id(weight)]


def group_scores(weights: list[torch.Tensor], importance: Importance) -> torch.Tensor:
    """Summed importance of a coupled group's weights, each member normalised by its mean so no layer
    dominates; on the device the scores come from."""
    total = None
    for weight in weights:
        scores = importance(weight).float()
        scores = scores / scores.mean().clamp_min(1e-12)
        total = scores if total is None else total + scores
    return total


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in ascending index order (keeping order keeps outputs exact)."""
    if keep >= len(scores):
        return torch.arange(len(scores))
    return torch.topk(scores, keep).indices.sort().values


@torch.no_grad()
def _copy_conv_bn(dst: nn.Sequential, src: nn.Sequential, out_idx: torch.Tensor, in_idx: torch.Tensor) -> None:
    conv, bn = src[0], src[1]
    dst[0].weight.copy_(conv.weight[out_idx][:, in_idx])
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst[1], name).copy_(getattr(bn, name)[out_idx])
    dst[1].num_batches_tracked.copy_(bn.num_batches_tracked)


def shrink(teacher: ResNet, removed: Iterable[str] = (), widths: Mapping[str, int] | Iterable = (),
           importance: Importance = l1_importance, round_to: int = 1) -> ResNet:
    """Build the smaller network on the CPU, initialised from the teacher's weights (eval mode)."""
    arch = derive_arch(teacher.arch, removed, widths, round_to)
    student = build_model(arch).eval()
    groups = streams(teacher.arch)
    teacher_blocks = {name: teacher.get_submodule(name) for name in teacher.arch.block_names()}
    kept: dict[str, torch.Tensor] = {}
    for key, producers in groups.producers.items():
        convs = [conv for p in producers for conv in _producer_convs(teacher, teacher_blocks, p, arch)]
        kept[key] = _top(group_scores([c.weight for c in convs], importance).cpu(), _stream_width(arch, key, groups))
    _copy_conv_bn(student.stem, teacher.stem, kept[groups.of_output["stem"]], torch.arange(arch.in_channels))
    cin = kept[groups.of_output["stem"]]
    for name, block in arch.blocks():
        out = kept[groups.of_output[name]]
        _copy_block(student.get_submodule(name), teacher_blocks[name], block, cin, out, importance)
        cin = out
    with torch.no_grad():
        student.fc.weight.copy_(teacher.fc.weight[:, cin])
        student.fc.bias.copy_(teacher.fc.bias)
    return student


def _producer_convs(teacher: ResNet, blocks: dict[str, nn.Module], producer: str, arch: ResNetArch) -> list[nn.Conv2d]:
    """The convs whose filters make a stream's channels at `producer` in the student."""
    if producer == "stem":
        return [teacher.stem[0]]
    block = blocks[producer]
    convs = [] if isinstance(block.shortcut, nn.Identity) else [block.shortcut[0]]
    if not dict(arch.blocks())[producer].removed:
        convs.append(block.conv2[0])
    return convs


def _copy_block(dst: BasicBlock, src: BasicBlock, arch: BlockArch, cin: torch.Tensor, out: torch.Tensor,
                importance: Importance) -> None:
    if not isinstance(src.shortcut, nn.Identity):
        _copy_conv_bn(dst.shortcut, src.shortcut, out, cin)
    if arch.removed:
        return
    mid = _top(importance(src.conv1[0].weight).float().cpu(), arch.mid)
    _copy_conv_bn(dst.conv1, src.conv1, mid, cin)
    _copy_conv_bn(dst.conv2, src.conv2, out, mid)


def predicted_params(arch: ResNetArch) -> int:
    """Parameters of an architecture without building it (what a spec predicts)."""
    def conv_bn(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout

    total = conv_bn(arch.in_channels, arch.stem, 3)
    for _, block, cin in arch.block_inputs():
        if block.needs_projection(cin):
            total += conv_bn(cin, block.out, 1)
        if not block.removed:
            total += conv_bn(cin, block.mid, 3) + conv_bn(block.mid, block.out, 3)
    return total + arch.out_channels() * arch.num_classes + arch.num_classes


def removable_blocks(teacher: ResNet) -> tuple[str, ...]:
    """Names of the teacher's blocks that removal may act on (the N2N agent's), in forward order."""
    return tuple(d.name for d in teacher.describe() if d.type == LayerType.BLOCK and d.removable)
