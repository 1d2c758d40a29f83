"""`method: grid` — an explicit list of transformations of the teacher: its `search:` schema and registration
(the driver: driver.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from searchsvc.budget import Budget
from searchsvc.registry import SearchSection, budget_field, register_method, round_to_field
from searchsvc.rewards import RewardForm

if TYPE_CHECKING:
    from searchsvc.config import JobConfig


@dataclass(frozen=True)
class GridCandidate:
    """One transformation: blocks to remove, a width multiplier, explicit widths (applied last)."""

    remove: tuple[str, ...] = field(default=(), metadata={
        "help": "block names, e.g. layer2.1 (checked at validate against the teacher's removable blocks)"})
    scale: float | None = field(default=None, metadata={"gt": 0, "max": 1, "help": "multiplier on every width"})
    widths: dict[str, int] = field(default_factory=dict, metadata={
        "help": "width key → channels, each in [1, the teacher's] (keys checked at validate against the teacher)"})


def check_grid(config: JobConfig) -> list[str]:
    """Every candidate's removals and widths name the teacher's own blocks and width keys, within its channels."""
    from searchsvc.methods.grid.widths import grid_problems

    return grid_problems(config)


@register_method("grid", "evaluate an explicit list of transformations",
                 driver="searchsvc.methods.grid.driver:run_grid",
                 residual_only=True, check=check_grid, user_models=True, cuts=True)
@dataclass(frozen=True)
class GridSearch(SearchSection):
    """An explicit list of candidates."""

    candidates: tuple[GridCandidate, ...] = field(default=(GridCandidate(scale=0.5),),
                                                  metadata={"help": "the transformations to evaluate"})
    round_to: int = round_to_field()
    reward: RewardForm = field(default="c_2_minus_c", metadata={"help": "c_2_minus_c or c_over_2_minus_c"})
    budget: Budget | None = budget_field()
