"""User networks torch.fx cannot trace: one whose data picks a branch (refused by the methods that cut), one that
only checks its input's shape (every layer runs: cut through Torch-Pruning's graph as any other)."""

from __future__ import annotations

import torch
from torch import nn


class InputGate(nn.Module):
    """A bright image takes branch `a`, a dark one (the all-zero example a trace runs on) branch `b`."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.sum() > 0
        x = torch.relu(self.stem(x))
        x = x + (self.a(x) if bright else self.b(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ShapeChecked(nn.Module):
    """A Python check of the input's size: fx cannot trace it, yet every layer runs on every input."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 4:
            raise ValueError("images of at least 4 px")
        x = torch.relu(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def input_gate(num_classes: int = 4) -> InputGate:
    return InputGate(num_classes)


def shape_checked(num_classes: int = 4) -> ShapeChecked:
    return ShapeChecked(num_classes)
