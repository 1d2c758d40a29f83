"""What the `search.tune:` section of every Ray Tune method shares (pure data: validate imports no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.training.train import MAX_LR


def check_positive_choices(key: str, values: tuple[int, ...]) -> None:
    """Every choice a positive integer (epochs, ending epochs): ValueError naming `key[i]` otherwise."""
    for i, value in enumerate(values):
        if value < 1:
            raise ValueError(f"{key}[{i}]: must be a positive integer, got {value}")


@dataclass(frozen=True)
class LogRange:
    """A log-uniform range [low, high] (learning rates)."""

    low: float = field(metadata={"gt": 0, "max": MAX_LR, "help": "smallest value"})
    high: float = field(metadata={"gt": 0, "max": MAX_LR, "help": "largest value"})

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"high: must be at least low ({self.low}), got {self.high}")


@dataclass(frozen=True)
class SweepTune:
    """What every Tune sweep shares: the lr to try, ASHA's rungs, restarts of failed trials.

    Each method adds its own keys as lists of choices: every combination of the lists is one trial
    (a grid, so no two trials repeat each other's work); an empty list keeps the value of `search` /
    `train`. lr may instead be a {low, high} range: each combination then gets `num_samples` lr draws.
    """

    num_samples: int = field(default=1, metadata={"min": 1, "help": "lr samples per combination (lr a range)"})
    lr: tuple[float, ...] | LogRange = field(default=(), metadata={
        "help": f"lr: choices or {{low, high}}, each in (0, {MAX_LR:g}]"})
    grace_period: int = field(default=1, metadata={"min": 1, "help": "iterations / epochs before ASHA may stop a trial"})
    reduction_factor: int = field(default=2, metadata={"min": 2, "help": "ASHA keeps 1/reduction_factor per rung"})
    max_failures: int = field(default=2, metadata={"min": 0, "help": "restarts of a trial whose worker fails"})

    def __post_init__(self) -> None:
        for i, lr in enumerate(self.lr if isinstance(self.lr, tuple) else ()):
            if not 0 < lr <= MAX_LR:
                raise ValueError(f"lr[{i}]: must be a number in (0, {MAX_LR:g}], got {lr:g}")
