"""What one input of a model looks like — taken from the data, not assumed to be a square image.

Tracing, the dependency graph, MACs, latency, summaries and ONNX export all run the model on an example input;
`InputSpec` is the one description of it they share: an example's shape without the batch dimension — [C, H, W]
for images of any size and aspect, [F] for feature vectors, [C, L] for sequences, [L] token ids of a vocabulary
of `tokens` (integers, e.g. a text model's input) — as the data loader delivers it.
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

    shape: tuple[int, ...]
    tokens: int | None = None  # the vocabulary's size when the inputs are token ids

    def __post_init__(self) -> None:
        if not self.shape or any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"an input shape is one or more positive sizes, got {self.shape!r}")

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
            return cls(tuple(int(n) for n in meta["input_shape"]), meta.get("input_tokens"))
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
        if self.is_image and self.shape[1] == self.shape[2]:
            record["image_size"] = self.shape[2]
        return record

    def __str__(self) -> str:
        shape = "x".join(str(n) for n in self.shape)
        return shape if self.tokens is None else f"{shape} token ids (< {self.tokens})"

    def batch(self, size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              random: bool = False, seed: int = 0) -> torch.Tensor:
        """`size` examples: zeros, or standard normal values from `seed` (timing: no all-zero shortcuts);
        channels_last for images (the layout training and timing use). Token ids: zeros or random ids, int64."""
        shape = (size, *self.shape)
        if self.tokens is not None:
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, self.tokens, shape, generator=generator) if random else torch.zeros(shape)
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


def in_layout(batch: torch.Tensor, layout: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """`batch` in the memory layout training and timing use — which applies to image batches [N, C, H, W] only:
    any other input stays contiguous as it is."""
    return batch.contiguous(memory_format=layout) if batch.dim() == 4 else batch.contiguous()
