"""`method: grid` — an explicit list of transformations of the teacher: its `search:` schema and registration
(the driver: driver.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from searchsvc.budget import Budget
from searchsvc.registry import SearchSection, budget_field, register_method
from searchsvc.rewards import RewardForm


@dataclass(frozen=True)
class GridCandidate:
    """One transformation: blocks to remove, a width multiplier, explicit widths (applied last)."""

    remove: tuple[str, ...] = field(default=(), metadata={"help": "block names, e.g. layer2.1"})
    scale: float | None = field(default=None, metadata={"gt": 0, "max": 1, "help": "multiplier on every width"})
    widths: dict[str, int] = field(default_factory=dict, metadata={"help": "width key → channels"})


@register_method("grid", "evaluate an explicit list of transformations",
                 driver="searchsvc.methods.grid.driver:run_grid",
                 residual_only=True, user_models=True, cuts=True)
@dataclass(frozen=True)
class GridSearch(SearchSection):
    """An explicit list of candidates."""

    candidates: tuple[GridCandidate, ...] = field(default=(GridCandidate(scale=0.5),),
                                                  metadata={"help": "the transformations to evaluate"})
    round_to: int = field(default=1, metadata={"min": 1, "help": "round channel counts up to a multiple"})
    reward: RewardForm = field(default="c_2_minus_c", metadata={"help": "c_2_minus_c or c_over_2_minus_c"})
    budget: Budget | None = budget_field()
