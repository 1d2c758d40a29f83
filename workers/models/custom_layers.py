"""Torch-Pruning pruners for the transformer layers whose inside Torch-Pruning should not trace.

torchvision's Swin computes attention on windows: every block reshapes its stream into windows and back, and
Torch-Pruning's index mapping follows each reshape by multiplying index lists, so the dependency graph of
Swin-T at 32 px needed more than 16 GB before it finished. Given a pruner of its own, a layer is one node of
the graph, and while the graph is traced (`opaque`) the layer's output is tied in autograd to its input alone,
so nothing inside it is followed: the graph of Swin-T then takes under a GB.

- `WindowAttentionPruner` (Swin's `ShiftedWindowAttention`, V1 and V2): q, k, v and the output projection are as
  wide as the stream the layer reads (its forward splits the input's width into `num_heads` heads), so pruning
  the stream prunes the same positions of q, k and v and of the projection. `num_heads` is kept and each head
  narrows: the group's slices are the heads (`depgraph.channel_groups`), so every head keeps its own channels.
  Removing whole heads instead would need an inner width apart from the stream's, which these layers lack.
- `PatchMergingPruner` (Swin's `PatchMerging`, V1 and V2): its input is four 2x2 neighbours concatenated, so an
  input channel is four columns of `reduction` (and four of V1's LayerNorm); its outputs are `reduction`'s rows
  (and V2's LayerNorm).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models import swin_transformer as swin

NEIGHBOURS = 4  # a patch-merging input channel appears once per 2x2 neighbour


class WindowAttentionPruner(tp.BasePruningFunc):
    """Swin's shifted-window attention as one layer whose input and output channels are the same stream."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.qkv.in_features
        tp.prune_linear_out_channels(layer.qkv, [i + part * width for part in range(3) for i in idxs])  # q, k, v
        tp.prune_linear_in_channels(layer.qkv, list(idxs))
        tp.prune_linear_out_channels(layer.proj, list(idxs))
        tp.prune_linear_in_channels(layer.proj, list(idxs))
        return layer

    prune_in_channels = prune_out_channels  # one function: Torch-Pruning couples a layer's input and output

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.proj.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return layer.num_heads

    get_in_channel_groups = get_out_channel_groups


class PatchMergingPruner(tp.BasePruningFunc):
    """Swin's patch merging: C input channels seen as 4C concatenated columns, 2C outputs."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        width = layer.reduction.in_features // NEIGHBOURS  # not `layer.dim`: a rebuilt layer keeps the constructor's
        columns = [i + part * width for part in range(NEIGHBOURS) for i in idxs]
        tp.prune_linear_in_channels(layer.reduction, columns)
        if not isinstance(layer, swin.PatchMergingV2):  # V1 normalises the concatenation
            tp.prune_layernorm_out_channels(layer.norm, columns)
        layer.dim = width - len(idxs)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if isinstance(layer, swin.PatchMergingV2):  # V2 normalises the output
            tp.prune_layernorm_out_channels(layer.norm, list(idxs))
        tp.prune_linear_out_channels(layer.reduction, list(idxs))
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // NEIGHBOURS


def customized_pruners() -> dict[type[nn.Module], tp.BasePruningFunc]:
    """Layer class → its pruner (Torch-Pruning looks classes up exactly: subclasses are listed)."""
    attention, merging = WindowAttentionPruner(), PatchMergingPruner()
    return {swin.ShiftedWindowAttention: attention, swin.ShiftedWindowAttentionV2: attention,
            swin.PatchMerging: merging, swin.PatchMergingV2: merging}


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
