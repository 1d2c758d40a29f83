"""A stored candidate of a user's network made again: its constructor, its units removed, every layer at the
shapes of its stored tensors, the tensors loaded. The store holds tensors only, never a pickled module, so
this is how `load_candidate`, `export` and a taylor step's parent come back (`cutting.shrink_graph` cut them).

Layers torch describes (conv, linear, norms, nn.MultiheadAttention) take the sizes of their tensors; a module
of the user's or torchvision's own whose tensors changed along one dimension (a layer scale, a class token)
gets new tensors of the stored shapes, and its integer attributes that held an old size take the new one
(`follow_counts`); the layers with pruners of ours set their counts from their layers (`custom_layers.settle`).
`rebuild_mismatch` shows a candidate comes back computing the same outputs before it is recorded ok.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from core.errors import first_line
from workers.models.surgery import InvalidTransform
from workers.models.zoo import load_tensors

LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
          nn.MultiheadAttention)  # the layers whose shape attributes `rebuild` sets itself


class Skip(nn.Identity):
    """A removed unit: passes its first input on, whatever else it is called with (a transformer block that also
    takes a padding mask); an `nn.Identity`, so the graph reads it as a shortcut."""

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return x


def remove_units(model: nn.Module, removed: Iterable[str]) -> nn.Module:
    """`model` with each named unit replaced by identity (in place), its activations no longer in place."""
    removed = tuple(removed)
    for name in removed:
        model.set_submodule(name, Skip())
    return not_in_place(model) if removed else model


def not_in_place(model: nn.Module) -> nn.Module:
    """Every `inplace` activation of `model` made out of place (the same values): after a removed layer, VGG's
    ReLU(inplace=True) would overwrite the previous ReLU's output, which that one's backward still needs."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def rebuild_mismatch(model: nn.Module, fresh: nn.Module, removed: Iterable[str], example: torch.Tensor) -> str | None:
    """Why `model` (on the CPU, eval mode) would not come back from its stored tensors: None when `rebuild` of
    `fresh`, a new instance of its constructor, computes the same outputs on `example`; else one line (what a
    candidate that `load_candidate` and `export` could not load is recorded with, instead of `ok`)."""
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    try:
        again = rebuild(fresh, removed, state)
        with torch.no_grad():
            ours, theirs = model.eval()(example), again(example)
    except Exception as err:  # noqa: BLE001 — a layer rebuild cannot size, a forward that fails: one line
        return f"cannot be rebuilt from its stored tensors ({type(err).__name__}: {first_line(err)})"
    if not _same_outputs(ours, theirs):
        return "rebuilt from its stored tensors, it computes other outputs than the model trained"
    return None


def _same_outputs(ours: object, theirs: object) -> bool:
    """Equal outputs: tensors close, a dict's or tuple's (a task's network, issue 37) entry by entry."""
    if isinstance(ours, torch.Tensor) and isinstance(theirs, torch.Tensor):
        return ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same_outputs(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, (tuple, list)) and isinstance(theirs, (tuple, list)):
        return len(ours) == len(theirs) and all(_same_outputs(a, b) for a, b in zip(ours, theirs))
    return False


def _resize_attention(module: nn.MultiheadAttention, width: int) -> None:
    """nn.MultiheadAttention at embedding width `width` (q, k and v as wide): `num_heads` kept, so each head's
    width falls with the stream's (the pruned stream loses the same positions from every head)."""
    module.embed_dim = module.kdim = module.vdim = width
    module.head_dim = width // module.num_heads


def rebuild(model: nn.Module, removed: Iterable[str], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A fresh instance of the base model made into a stored candidate: units removed, every layer resized
    to its stored tensors, the weights loaded (strict). Nothing is unpickled: `state` is tensors."""
    from workers.models.custom_layers import settle

    remove_units(model, removed)
    for name, module in model.named_modules():
        _resize(name, module, state)
    for module in model.modules():  # after every layer has its shape: a block's counts follow its layers'
        settle(module)
    load_tensors(model, state)
    return model.eval()


def own_shapes(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Module name → the shapes of its own parameters and buffers (what pruning changes)."""
    return {name: {key: tuple(t.shape) for key, t in _own_tensors(module).items()}
            for name, module in model.named_modules()}


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    own = dict(module.named_parameters(recurse=False))
    own.update((key, t) for key, t in module.named_buffers(recurse=False) if t is not None)
    return own


def follow_counts(module: nn.Module, old: Mapping[str, tuple], new: Mapping[str, tuple]) -> bool:
    """A module torch does not describe (VisionTransformer, ConvNeXt's CNBlock) whose own tensors changed along
    one dimension each, old size → new size consistently: its integer attributes that held an old size take the
    new one (`VisionTransformer.hidden_dim`, which its forward reshapes by), and so do such entries of its tuples
    of integers (timm's `Scale.shape`, `(dim, 1, 1)`). False if the change is not of that
    kind: then nothing is known to rebuild it."""
    sizes: dict[int, int] = {}
    for key, shape in new.items():
        before = old[key]
        if before == shape:
            continue
        changed = [(a, b) for a, b in zip(before, shape) if a != b]
        if len(before) != len(shape) or len(changed) != 1 or sizes.get(changed[0][0], changed[0][1]) != changed[0][1]:
            return False
        sizes[changed[0][0]] = changed[0][1]
    for attr, value in list(vars(module).items()):
        if type(value) is int and value in sizes:  # bool is an int subclass: `training` is left alone
            setattr(module, attr, sizes[value])
        elif type(value) is tuple and value and all(type(v) is int for v in value) and set(value) & set(sizes):
            setattr(module, attr, tuple(sizes.get(v, v) for v in value))  # a shape its forward views by: timm's Scale
    return bool(sizes)


def kernel_cuttable(module: nn.Module) -> bool:
    """A conv whose kernel can be cut around its centre (cutting.cut_kernels): square, undilated, zero-padded
    (other padding modes pad by a copy of `padding` taken at construction)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size[0] == module.kernel_size[1]
            and module.dilation == (1, 1) and module.padding_mode == "zeros")


def set_kernel(conv: nn.modules.conv._ConvNd, kernel: tuple[int, ...]) -> None:
    """`conv`'s kernel size set to `kernel` (a centred cut of its own), its padding smaller by as much as each side
    lost, so the output keeps its size where the padding allows ("same" keeps it by itself)."""
    trims = [(k - s) // 2 for k, s in zip(conv.kernel_size, kernel)]
    if not isinstance(conv.padding, str):
        conv.padding = tuple(max(0, p - t) for p, t in zip(conv.padding, trims))
    conv.kernel_size = tuple(kernel)


def _resize(name: str, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give one layer the shapes of its stored tensors (only what channel pruning changes)."""
    prefix = f"{name}." if name else ""
    stored = {key: state[prefix + key] for key in _own_tensors(module) if prefix + key in state}
    if all(tuple(getattr(module, key).shape) == tuple(t.shape) for key, t in stored.items()):
        return
    weight = stored.get("weight")
    if isinstance(module, nn.modules.conv._ConvNd) and weight is not None:
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if tuple(weight.shape[2:]) != tuple(module.kernel_size):  # a cut kernel (cutting.cut_kernels)
            set_kernel(module, tuple(weight.shape[2:]))
        module.out_channels = weight.shape[0]
        module.groups = weight.shape[0] if depthwise else module.groups
        module.in_channels = weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = stored["running_mean"].shape[0]
    elif isinstance(module, nn.LayerNorm) and weight is not None:
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.GroupNorm) and weight is not None:
        module.num_channels = weight.shape[0]
    elif isinstance(module, nn.MultiheadAttention) and "in_proj_weight" in stored:
        _resize_attention(module, stored["in_proj_weight"].shape[1])
    elif follow_counts(module, {k: tuple(getattr(module, k).shape) for k in stored},
                        {k: tuple(t.shape) for k, t in stored.items()}):
        pass  # tensors of a module of its own (layer scale, class token): the stored shapes and its counts follow
    else:
        raise InvalidTransform(f"cannot rebuild {name or 'the model'} ({type(module).__name__}) at its stored shapes")
    for key, tensor in stored.items():
        current = getattr(module, key)
        fresh = torch.empty(tensor.shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(module, key, nn.Parameter(fresh, requires_grad=current.requires_grad))
        else:
            setattr(module, key, fresh)
