"""`method: taylor` — iterative Taylor filter pruning as a Ray Tune sweep: its `search:` schema and registration
(the driver: driver.py; the worker's pruning step: workers/compression/taylor.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from searchsvc.budget import Budget
from searchsvc.registry import SearchSection, budget_field, register_method, round_to_field
from searchsvc.rewards import RewardForm
from searchsvc.sweeps.schema import SweepTune, check_positive_choices
from workers.compression.ranking import Normalizer


@dataclass(frozen=True)
class TaylorStop:
    """The seed's stop rule: a trial ends at the first iteration that breaks either bound."""

    min_accuracy: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "stop below this"})
    max_drop: float = field(default=2.0, metadata={"min": 0, "help": "stop this many points below the teacher"})


@dataclass(frozen=True)
class TaylorTune(SweepTune):
    """The Taylor sweep: step size, fine-tune epochs and distillation per trial; ASHA per iteration."""

    filters_per_iteration: tuple[int | float, ...] = field(default=(), metadata={"help": "choices"})
    epochs: tuple[int, ...] = field(default=(), metadata={"help": "fine-tune epochs per iteration: choices"})
    distill: tuple[bool, ...] = field(default=(), metadata={"help": "fine-tune with distillation: choices"})
    metric: Literal["reward", "accuracy"] = field(
        default="reward", metadata={"help": "per-iteration metric ASHA compares: reward (size and validation "
                                            "accuracy) or accuracy (validation)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_choices("epochs", self.epochs)


@register_method("taylor", "iterative Taylor filter pruning as a Ray Tune sweep",
                 driver="searchsvc.methods.taylor.driver:run_taylor", builder="workers.compression.taylor:taylor_step",
                 residual_only=True, user_models=True, cuts=True)
@dataclass(frozen=True)
class TaylorSearch(SearchSection):
    """Iterative filter pruning ranked by first-order Taylor importance, one Tune trial per sample."""

    iterations: int = field(default=5, metadata={"min": 1, "help": "prune / fine-tune rounds per trial"})
    filters_per_iteration: int | float = field(default=0.1, metadata={
        "gt": 0, "help": "channels removed per round: a count, or a fraction (< 1) of the teacher's channels"})
    importance_batches: int = field(default=8, metadata={"min": 1, "help": "training batches averaged for importance"})
    normalizer: Normalizer = field(default="mean", metadata={
        "help": "how each group's scores are scaled before all groups are ranked together: mean (divided by their "
                "mean; measured best, README: Pruning), l2 (by their L2 norm: wide groups go first) or none"})
    cost_power: float = field(default=0.0, metadata={
        "min": 0, "max": 2, "help": "with a budget, rank a channel by its score / its cost (MACs or parameters) to "
                                    "this power: 1 per unit of cost, 0 (measured best) the cost ignored"})
    round_to: int = round_to_field()
    max_ratio: float = field(default=1.0, metadata={
        "gt": 0, "max": 1, "help": "the most of any one group's teacher width that may be pruned (Torch-Pruning's "
                                   "max_pruning_ratio): 0.5 keeps every layer at least half as wide; 1: no floor"})
    stop: TaylorStop = field(default_factory=TaylorStop)
    tune: TaylorTune = field(default_factory=TaylorTune)
    reward: RewardForm = field(default="c_2_minus_c", metadata={"help": "c_2_minus_c or c_over_2_minus_c"})
    budget: Budget | None = budget_field()

    def __post_init__(self) -> None:
        for where, value in [("filters_per_iteration", self.filters_per_iteration),
                             *((f"tune.filters_per_iteration[{i}]", v)
                               for i, v in enumerate(self.tune.filters_per_iteration))]:
            if isinstance(value, float) and not 0 < value < 1:
                raise ValueError(f"{where}: a fraction must be in (0, 1), got {value} (write a count as an integer)")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{where}: a count must be a positive integer, got {value}")
