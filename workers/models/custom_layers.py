"""Torch-Pruning pruners for the transformer layers whose inside Torch-Pruning should not trace.

torchvision's Swin computes attention on windows: every block reshapes its stream into windows and back, and
Torch-Pruning's index mapping follows each reshape by multiplying index lists, so the dependency graph of
Swin-T at 32 px needed more than 16 GB before it finished. Given a pruner of its own, a layer is one node of
the graph, and while the graph is traced (`opaque`) the layer's output is tied in autograd to its input alone,
so nothing inside it is followed: the graph of Swin-T then takes under a GB.

- `WindowAttentionPruner` (torchvision's `ShiftedWindowAttention`, V1 and V2, and timm's Swin and Swin V2
  `WindowAttention`, which timm calls on windows its block makes): q, k, v and the output projection are as
  wide as the stream the layer reads (its forward splits the input's width into `num_heads` heads), so pruning
  the stream prunes the same positions of q, k and v and of the projection. `num_heads` is kept and each head
  narrows: the group's slices are the heads (`depgraph.channel_groups`), so every head keeps its own channels.
  Removing whole heads instead would need an inner width apart from the stream's, which these layers lack.
- `PatchMergingPruner` (`PatchMerging` of torchvision's and timm's Swin, V1 and V2): its input is four 2x2
  neighbours concatenated (the same layout in both), so an input channel is four columns of `reduction` (and
  four of V1's LayerNorm); its outputs are `reduction`'s rows (and V2's LayerNorm).
- `HeadsAttentionPruner` (MaxViT's `RelativePositionalMultiHeadAttention`): as Swin's, with q, k and v one
  `to_qkv` layer chunked in three and `merge` the output; `head_dim` narrows, `n_heads` stays.
- `MovesChannelsPruner` (MaxViT's `WindowPartition`, `WindowDepartition`, `SwapAxes`): reshapes that move every
  channel to the same channel of their output; one node each, channels passed through unchanged.
- `qkv_slices` (timm's `Attention`, or any attention module naming a `qkv` nn.Linear and an int `num_heads`):
  traced into, since its q, k and v have an inner width apart from the stream; their outputs are one group of
  3 x num_heads slices, so `head_dim` narrows alike in every head (`settle` then sets `head_dim`, `attn_dim`).
- `ShuffleBarrier` (ShuffleNet's `channel_shuffle`, a function): Torch-Pruning cannot map channels through the
  shuffle's 5-d view (it fails with ZeroDivisionError), so while the graph is traced the shuffle is a node that
  ends every channel group reaching it. Those groups (the streams between blocks) keep their width; the groups
  inside each block's branches are pruned as in any network.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import maxvit, shufflenetv2
from torchvision.models import swin_transformer as swin

NEIGHBOURS = 4  # a patch-merging input channel appears once per 2x2 neighbour


class WindowAttentionPruner(tp.BasePruningFunc):
    """Swin's shifted-window attention as one layer whose input and output channels are the same stream."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if _heads_as_wide_as_stream(layer):  # q, k, v and the projection's inputs narrow with the stream
            width = layer.qkv.in_features
            tp.prune_linear_out_channels(layer.qkv, [i + part * width for part in range(3) for i in idxs])
            tp.prune_linear_in_channels(layer.proj, list(idxs))
            keep = sorted(set(range(width)) - set(idxs))
            for name in ("q_bias", "v_bias"):  # timm's V2 keeps q and v biases apart from qkv
                if isinstance(getattr(layer, name, None), nn.Parameter):
                    setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, 0))
            settle(layer)
        tp.prune_linear_in_channels(layer.qkv, list(idxs))
        tp.prune_linear_out_channels(layer.proj, list(idxs))
        return layer

    prune_in_channels = prune_out_channels  # one function: Torch-Pruning couples a layer's input and output

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.num_heads if _heads_as_wide_as_stream(layer) else 1

    get_in_channel_groups = get_out_channel_groups


def _heads_as_wide_as_stream(layer: nn.Module) -> bool:
    """Whether q, k and v are each as wide as the stream (always in torchvision; in timm unless `head_dim` was
    given): then they narrow with it. Otherwise only the stream's sides are cut and every head keeps its width."""
    return layer.qkv.out_features == 3 * layer.qkv.in_features


class PatchMergingPruner(tp.BasePruningFunc):
    """Swin's patch merging: C input channels seen as 4C concatenated columns, 2C outputs."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.reduction.in_features // NEIGHBOURS  # not `layer.dim`: a rebuilt layer keeps the constructor's
        columns = [i + part * width for part in range(NEIGHBOURS) for i in idxs]
        tp.prune_linear_in_channels(layer.reduction, columns)
        if not isinstance(layer, _merging_v2_classes()):  # V1 normalises the concatenation
            tp.prune_layernorm_out_channels(layer.norm, columns)
        settle(layer)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if isinstance(layer, _merging_v2_classes()):  # V2 normalises the output
            tp.prune_layernorm_out_channels(layer.norm, list(idxs))
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // NEIGHBOURS


class HeadsAttentionPruner(tp.BasePruningFunc):
    """MaxViT's attention as one layer whose input and output channels are the same stream."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.merge.out_features
        tp.prune_linear_out_channels(layer.to_qkv, [i + part * width for part in range(3) for i in idxs])
        tp.prune_linear_in_channels(layer.to_qkv, list(idxs))
        tp.prune_linear_out_channels(layer.merge, list(idxs))
        tp.prune_linear_in_channels(layer.merge, list(idxs))
        settle(layer)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.merge.out_features

    get_in_channels = get_out_channels

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.n_heads

    get_in_channel_groups = get_out_channel_groups


class MovesChannelsPruner(tp.BasePruningFunc):
    """A layer without weights that moves each channel to the same channel index of its output."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> None:
        return None  # Torch-Pruning then reads the count from the layers around it

    get_in_channels = get_out_channels


def qkv_slices(model: nn.Module) -> dict[nn.Module, int]:
    """The q/k/v projection of every attention module Torch-Pruning traces into (timm's `Attention`, a user's
    own), known by its attributes: a `qkv` nn.Linear and an int `num_heads`. Its outputs are q, k and v for each
    head: 3 x num_heads slices, from which the same positions go, so every head of q, k and v narrows alike."""
    found = {}
    for module in model.modules():
        qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
        if isinstance(qkv, nn.Linear) and type(heads) is int and heads > 0 and qkv.out_features % (3 * heads) == 0:
            found[qkv] = 3 * heads
    return found


def head_width(module: nn.Module) -> int | None:
    """The width of each head of an attention layer whose softmax temperature is 1 / sqrt(that width): torch's
    nn.MultiheadAttention, torchvision's Swin (V1), timm's attention and Swin window attention (V1). None for any
    other layer, and for the cosine attention of Swin V2, whose q and k are normalised."""
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return module.embed_dim // module.num_heads
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    scaled = type(module) is swin.ShiftedWindowAttention or type(getattr(module, "scale", None)) is float
    if isinstance(qkv, nn.Linear) and type(heads) is int and scaled and not hasattr(module, "logit_scale"):
        return qkv.out_features // (3 * heads)
    return None


def keep_temperature(module: nn.Module, old_width: int) -> None:
    """After a cut narrowed each head of `module` from `old_width`: q times sqrt(new / old), so that q·k / sqrt(new)
    is the q·k / sqrt(old) the layer computed before on the channels kept (its scores before the softmax are
    unchanged where only zeros went, as in a thinned mask, instead of sharpened by sqrt(old / new))."""
    new_width = head_width(module)
    if new_width is None or new_width == old_width:
        return
    factor = math.sqrt(new_width / old_width)
    weight, bias = ((module.in_proj_weight, module.in_proj_bias) if isinstance(module, nn.MultiheadAttention)
                    else (module.qkv.weight, module.qkv.bias))
    rows = weight.shape[0] // 3  # q first, then k and v
    with torch.no_grad():
        weight[:rows].mul_(factor)
        if bias is not None:
            bias[:rows].mul_(factor)


def settle(module: nn.Module) -> None:
    """Set the counts a layer keeps beside its tensors from those tensors (after pruning or a rebuild): MaxViT's
    and timm's `head_dim` (and timm's `attn_dim`), which their forwards reshape by, and Swin's `PatchMerging.dim`."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "num_heads", None)
    if isinstance(qkv, nn.Linear) and type(heads) is int and type(getattr(module, "head_dim", None)) is int:
        module.head_dim = qkv.out_features // (3 * heads)
        if type(getattr(module, "attn_dim", None)) is int:
            module.attn_dim = module.head_dim * heads
    width = head_width(module)
    if width and type(getattr(module, "scale", None)) is float:  # timm's, used where fused attention is off
        module.scale = width ** -0.5
    if isinstance(module, maxvit.RelativePositionalMultiHeadAttention):
        module.head_dim = module.merge.in_features // module.n_heads
    elif isinstance(module, _merging_classes()):
        module.dim = module.reduction.in_features // NEIGHBOURS
    q_bias, k_bias = getattr(module, "q_bias", None), getattr(module, "k_bias", None)
    if isinstance(q_bias, nn.Parameter) and isinstance(k_bias, torch.Tensor) and k_bias.shape != q_bias.shape:
        module.k_bias = torch.zeros_like(q_bias.data)  # timm's V2: a zero buffer outside the state_dict


def _merging_classes() -> tuple[type[nn.Module], ...]:
    """Swin's patch-merging layers: torchvision's, and timm's, which concatenate the 2x2 neighbours in the same
    layout as torchvision's."""
    timm_swin = _timm_swin("")
    return (swin.PatchMerging,) + ((timm_swin.PatchMerging,) if timm_swin else ()) + _merging_v2_classes()


def _merging_v2_classes() -> tuple[type[nn.Module], ...]:
    """The patch mergings that normalise their output (V2), not their concatenated input."""
    timm_swin_v2 = _timm_swin("_v2")
    return (swin.PatchMergingV2,) + ((timm_swin_v2.PatchMerging,) if timm_swin_v2 else ())


def _timm_swin(version: str):
    """timm's Swin (`version` "") or Swin V2 ("_v2") module when it is imported (a model made of it has imported
    it; timm is optional), else None."""
    return sys.modules.get(f"timm.models.swin_transformer{version}")


class ShuffleBarrier(nn.Module):
    """Stands for `channel_shuffle` while a graph is traced: the shuffle's values, one node in the graph."""

    channels = 0

    def forward(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        self.channels = x.shape[1]
        return _Through.apply(x, _SHUFFLE(x, groups).detach())


class BarrierPruner(tp.BasePruningFunc):
    """A node no group crosses: its input and output pruning are two functions, so they are not coupled, and a
    group that reaches it is left out (`depgraph.channel_groups`), so neither is ever called."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError("a channel group that reaches a channel shuffle keeps its width")

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise RuntimeError("a channel group that reaches a channel shuffle keeps its width")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.channels

    get_in_channels = get_out_channels


_SHUFFLE = shufflenetv2.channel_shuffle
BARRIER = "searchsvc_shuffle"  # the child name a ShuffleNet block's barrier has while its graph is traced


def customized_pruners() -> dict[type[nn.Module], tp.BasePruningFunc]:
    """Layer class → its pruner (Torch-Pruning looks classes up exactly: subclasses are listed)."""
    attention, merging, moves = WindowAttentionPruner(), PatchMergingPruner(), MovesChannelsPruner()
    return {swin.ShiftedWindowAttention: attention, swin.ShiftedWindowAttentionV2: attention,
            ShuffleBarrier: BarrierPruner(), maxvit.RelativePositionalMultiHeadAttention: HeadsAttentionPruner(),
            maxvit.WindowPartition: moves, maxvit.WindowDepartition: moves, maxvit.SwapAxes: moves,
            **{merging_class: merging for merging_class in _merging_classes()},
            **{_timm_swin(v).WindowAttention: attention for v in ("", "_v2") if _timm_swin(v)}}


def unfollowable(model: nn.Module) -> str | None:
    """Why Torch-Pruning must not trace `model` (None: it may): timm's MaxViT and CoAtNet (`timm.models.maxxvit`)
    partition windows and grids in plain functions, which it follows index list by index list: past 20 GB within
    minutes at 64 px (measured), where the kernel's out-of-memory kill would end the run and its neighbours."""
    maxxvit = sys.modules.get("timm.models.maxxvit")
    if maxxvit is not None and any(isinstance(m, maxxvit.MaxxVit) for m in model.modules()):
        return ("timm's MaxxVit (MaxViT, CoAtNet) partitions its windows in functions that Torch-Pruning follows "
                "into tens of GB; torchvision's maxvit_t is supported")
    return None


@contextmanager
def traceable(model: nn.Module) -> Iterator[None]:
    """While open, `model` is what Torch-Pruning can trace: the layers with pruners of ours are single nodes
    (`opaque`) and ShuffleNet's channel shuffles are barriers (`shuffle_barriers`)."""
    with opaque(model, tuple(customized_pruners())), shuffle_barriers(model):
        yield


@contextmanager
def shuffle_barriers(model: nn.Module) -> Iterator[None]:
    """Every ShuffleNet block of `model` shuffles through a `ShuffleBarrier` child of its own while open (torchvision
    calls `channel_shuffle` as a module-level function: it is swapped for the time of the trace)."""
    blocks = [m for m in model.modules() if isinstance(m, shufflenetv2.InvertedResidual)]
    if not blocks:
        yield
        return
    calling: list[nn.Module] = []
    for block in blocks:
        block.add_module(BARRIER, ShuffleBarrier())
    hooks = [b.register_forward_pre_hook(lambda module, _args: calling.append(module)) for b in blocks]
    shufflenetv2.channel_shuffle = lambda x, groups: getattr(calling[-1], BARRIER)(x, groups)
    try:
        yield
    finally:
        shufflenetv2.channel_shuffle = _SHUFFLE
        for hook in hooks:
            hook.remove()
        for block in blocks:
            delattr(block, BARRIER)


class _Through(torch.autograd.Function):
    """A layer's output, linked in autograd to the layer's input only: what Torch-Pruning traces sees one step."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:  # noqa: ARG004 — the link
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


@contextmanager
def opaque(model: nn.Module, classes: tuple[type[nn.Module], ...]) -> Iterator[None]:
    """While open, every layer of `model` of one of `classes` gives an output that autograd links straight to its
    input (the values are the layer's own): the layers a pruner of ours handles are single nodes to trace."""
    def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _Through.apply(args[0], output.detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in classes]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
