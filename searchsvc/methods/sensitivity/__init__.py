"""Sensitivity analysis (`method: sensitivity`, `searchsvc sensitivity CONFIG`): its `search:` schema, its check
and registration (the driver: driver.py; which weights are analysed: weights.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from core.errors import SearchsvcError
from searchsvc.methods.sensitivity.weights import analysed_weights
from searchsvc.registry import SearchSection, register_method

if TYPE_CHECKING:
    from searchsvc.config import JobConfig


def check_sensitivity(config: JobConfig) -> list[str]:
    """The weights a sensitivity analysis names exist in the teacher's network (a user's network's channel
    groups traced on the data's shape, when the config tells it)."""
    from workers.data.datasets import input_shape
    from workers.training.teacher import untrained_network

    model, shape = untrained_network(config.teacher), input_shape(config.dataset)
    if shape is None and config.teacher.source is not None and config.search.structure == "filter":
        return []  # traced at run time, on the data's own shape
    try:
        analysed_weights(model, config.search, shape.example(model) if shape else None)
    except SearchsvcError as err:
        return [str(err)]
    return []


@register_method("sensitivity", "prune each layer alone to each level (searchsvc sensitivity)",
                 driver="searchsvc.methods.sensitivity.driver:run_sensitivity",
                 builder="workers.compression.agp:sensitivity_step", check=check_sensitivity, user_models=True)
@dataclass(frozen=True)
class SensitivitySearch(SearchSection):
    """Sensitivity analysis: each weight pruned alone to each level, evaluated without fine-tuning."""

    levels: tuple[float, ...] = field(default=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                                      metadata={"help": "sparsity levels in [0, 1)"})
    structure: Literal["element", "filter"] = field(default="element", metadata={
        "help": "element: smallest |w| zeroed; filter: whole filters by L1 (with their channel group)"})
    weights: tuple[str, ...] = field(default=(), metadata={
        "help": "parameter names to analyse; empty: every conv / linear weight (one per channel group for filter)"})
    tolerance: float = field(default=1.0, metadata={
        "min": 0, "help": "accuracy points a layer may lose at its level in the written starting schedule"})
    schedule_ending_epoch: int = field(default=10, metadata={
        "min": 1, "help": "ending_epoch of the policies in the written starting schedule"})

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("levels: give at least one level")
        for i, level in enumerate(self.levels):
            if not 0 <= level < 1:
                raise ValueError(f"levels[{i}]: a sparsity must be in [0, 1), got {level}")
