"""A sweep's search space from its `tune:` section: every combination of the choice lists is one trial (a grid), lr as
choices or a log-uniform range; the metric ASHA compares."""

from __future__ import annotations

import math
from typing import Any

from ray import tune

from searchsvc.sweeps.schema import LogRange, SweepTune

# A config's metric → the report key ASHA compares: "accuracy" is validation accuracy (test only reports).
TUNE_METRICS = {"reward": "reward", "accuracy": "val_accuracy"}


def choose(values: tuple, default: Any) -> Any:
    """A list of choices as a Tune grid (one value: that value; none: the default)."""
    return default if not values else values[0] if len(values) == 1 else tune.grid_search(list(values))


def lr_space(sweep: SweepTune, default: float) -> Any:
    """lr as choices (a grid) or a log-uniform range."""
    lr = sweep.lr
    return tune.loguniform(lr.low, lr.high) if isinstance(lr, LogRange) else choose(lr, default)


def samples_per_point(sweep: SweepTune) -> int:
    """Tune's num_samples: lr draws per grid point when lr is a range; else 1 (a repeat would be identical)."""
    return sweep.num_samples if isinstance(sweep.lr, LogRange) else 1


def trial_count(sweep: SweepTune, *choice_lists: tuple) -> int:
    """Trials of the sweep: the grid's combinations (lr's choices included) times the samples per point."""
    lists = (*choice_lists, () if isinstance(sweep.lr, LogRange) else sweep.lr)
    return math.prod(max(1, len(v)) for v in lists) * samples_per_point(sweep)
