"""What one input of a model looks like — taken from the data, not assumed to be a square image.

Tracing, the dependency graph, MACs, latency, summaries and ONNX export all run the model on an example input;
`InputSpec` is the one description of it they share: an example's shape without the batch dimension — [C, H, W]
for images of any size and aspect, [F] for feature vectors, [C, L] for sequences, [L] token ids of a vocabulary
of `tokens` (integers, e.g. a text model's input) — as the data loader delivers it.

Inputs of several parts — a tokenizer's `{"input_ids": ..., "attention_mask": ...}`, each [L] integers — travel
packed as one [P, L] tensor per example (so every data path indexes, moves and batches one tensor); `parts` names
them in order, and `keyword_inputs` makes the model unpack a packed batch into its keyword arguments
(`model(input_ids=x[:, 0], attention_mask=x[:, 1])`, what a Hugging Face model takes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    """One example's input as the model receives it: `shape` without the batch dimension; floating point, or
    with `tokens` int64 token ids below it."""

    shape: tuple[int, ...]  # with parts: [P, *part's shape], the packed form
    tokens: int | None = None  # the vocabulary's size when the inputs are token ids
    parts: tuple[str, ...] | None = None  # the model's keyword arguments, one per packed part (token ids first)

    def __post_init__(self) -> None:
        if not self.shape or any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"an input shape is one or more positive sizes, got {self.shape!r}")
        if self.parts is not None and (self.tokens is None or len(self.parts) != self.shape[0]):
            raise ValueError(f"inputs of parts {self.parts!r} are token ids packed [P, ...], got {self.shape!r}")

    @classmethod
    def image(cls, channels: int, height: int, width: int | None = None) -> InputSpec:
        """[channels, height, width] images (square when `width` is not given)."""
        return cls((int(channels), int(height), int(height if width is None else width)))

    @classmethod
    def of(cls, shape: Sequence[int]) -> InputSpec:
        return cls(tuple(int(n) for n in shape))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], channels: int | None = None) -> InputSpec:
        """The input a stored teacher was trained on: its `input_shape`, or (stored before inputs of any shape)
        its `in_channels` (else `channels`) and square `image_size` (default 32 px)."""
        if meta.get("input_shape"):
            parts = meta.get("input_parts")
            return cls(tuple(int(n) for n in meta["input_shape"]), meta.get("input_tokens"),
                       tuple(parts) if parts else None)
        return cls.image(int(meta.get("in_channels") or channels or 3), int(meta.get("image_size", 32)))

    @property
    def channels(self) -> int:
        """The first dimension: an image's channels (a feature vector's length)."""
        return self.shape[0]

    @property
    def is_image(self) -> bool:
        """[C, H, W]: what convolutions, crops, flips and channels_last apply to."""
        return len(self.shape) == 3 and self.tokens is None

    @property
    def dtype(self) -> torch.dtype:
        """What a batch of it holds: int64 token ids, else float32."""
        return torch.int64 if self.tokens is not None else torch.float32

    @property
    def values(self) -> int:
        """Numbers in one example."""
        return math.prod(self.shape)

    def meta(self) -> dict[str, Any]:
        """As a teacher's stored meta records it (in_channels and image_size kept for older readers)."""
        record: dict[str, Any] = {"input_shape": list(self.shape), "in_channels": self.channels}
        if self.tokens is not None:
            record["input_tokens"] = self.tokens
        if self.parts is not None:
            record["input_parts"] = list(self.parts)
        if self.is_image and self.shape[1] == self.shape[2]:
            record["image_size"] = self.shape[2]
        return record

    def __str__(self) -> str:
        if self.parts is not None:
            shape = "x".join(str(n) for n in self.shape[1:])
            return f"{', '.join(self.parts)}: {shape} integers each (token ids < {self.tokens})"
        shape = "x".join(str(n) for n in self.shape)
        return shape if self.tokens is None else f"{shape} token ids (< {self.tokens})"

    def batch(self, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              random: bool = False, seed: int = 0) -> torch.Tensor:
        """`size` examples: zeros, or standard normal values from `seed` (timing: no all-zero shortcuts);
        channels_last for images (the layout training and timing use). Token ids: zeros or random ids, int64; of
        several parts, the other parts (masks, token types) ones."""
        shape = (size, *self.shape)
        if self.tokens is not None:
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.tokens, shape, generator=generator) if random else torch.zeros(shape)
            if self.parts is not None:
                ids[:, 1:] = 1  # a mask of ones attends to every position; token type 1 exists in every vocabulary
            return ids.to(device=device, dtype=torch.int64)
        if random:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
        else:
            x = torch.zeros(shape, device=device, dtype=dtype)
        return in_layout(x)

    def example(self, model: nn.Module, size: int = 1) -> torch.Tensor:
        """Zero examples on the model's device and in its dtype: what tracing and counting run on. Token ids are
        ones, not zeros: id 0 is commonly padding, and a sequence of padding alone attends to nothing (NaN)."""
        probe = next(model.parameters())
        if self.tokens is not None:
            return torch.ones(size, *self.shape, device=probe.device, dtype=torch.int64)
        return torch.zeros(size, *self.shape, device=probe.device, dtype=probe.dtype)


class KeywordInputs:
    """A forward pre-hook: a packed batch [N, P, ...] given alone → the model's keyword arguments, one per part
    (`names`). A call with keyword arguments already (an export's wrapper) passes through."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return None
        packed = args[0]
        return (), {name: packed[:, i] for i, name in enumerate(self.names)}


def keyword_inputs(model: nn.Module, inputs: InputSpec | None) -> nn.Module:
    """`model`, made to take `inputs`' packed parts as its keyword arguments (a forward pre-hook: its state_dict,
    module names and class stay as they are); any other model as it is. Idempotent."""
    if inputs is None or inputs.parts is None:
        return model
    if not any(isinstance(hook, KeywordInputs) for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(KeywordInputs(inputs.parts), with_kwargs=True)
    return model


class PartsModel(nn.Module):
    """A model of several keyword inputs as exports take it: one positional argument per part, in `names`' order
    (ONNX inputs named after them; TorchScript's forward takes them in that order)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, tuple(names)

    def forward(self, *parts: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, parts)))


def in_layout(batch: torch.Tensor, layout: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """`batch` in the memory layout training and timing use — which applies to image batches [N, C, H, W] only:
    any other input stays contiguous as it is."""
    return batch.contiguous(memory_format=layout) if batch.dim() == 4 else batch.contiguous()
