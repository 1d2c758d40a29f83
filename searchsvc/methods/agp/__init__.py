"""`method: agp` — gradual pruning from a Distiller YAML schedule, then thinning, as a Ray Tune sweep: its
`search:` schema, its check and registration (the driver: driver.py; the schedule's Tune variants: variants.py;
the worker's step: workers/compression/agp.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.names import is_number
from searchsvc.budget import Budget
from searchsvc.methods.agp.variants import check_agp
from searchsvc.registry import SearchSection, budget_field, register_method, round_to_field
from searchsvc.rewards import RewardForm
from searchsvc.sweeps.schema import SweepTune, check_positive_choices


@dataclass(frozen=True)
class AgpTune(SweepTune):
    """The AGP sweep: each trial runs the schedule with its own final sparsities, ending epoch and lr;
    ASHA compares trials on validation accuracy after every epoch."""

    final_sparsity: tuple[float | dict[str, float], ...] = field(default=(), metadata={
        "help": "choices; a number sets every AGP pruner's final_sparsity, a mapping sets named pruners"})
    ending_epoch: tuple[int, ...] = field(default=(), metadata={
        "help": "choices; each sets the ending_epoch of every pruner policy"})
    epochs: tuple[int, ...] = field(default=(), metadata={"help": "training epochs per trial: choices"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for i, value in enumerate(self.final_sparsity):
            for name, level in (value.items() if isinstance(value, dict) else [("", value)]):
                if not is_number(level) or not 0 <= level < 1:
                    where = f"final_sparsity[{i}]" + (f".{name}" if name else "")
                    raise ValueError(f"{where}: a sparsity must be in [0, 1), got {level}")
        check_positive_choices("ending_epoch", self.ending_epoch)
        check_positive_choices("epochs", self.epochs)


@register_method("agp", "gradual pruning from a Distiller YAML schedule, then thinning, as a Tune sweep",
                 driver="searchsvc.methods.agp.driver:run_agp", builder="workers.compression.agp:agp_step",
                 check=check_agp, user_models=True)
@dataclass(frozen=True)
class AgpSearch(SearchSection):
    """Distiller-style gradual pruning from a YAML schedule, thinned afterwards; one Tune trial per sample."""

    schedule: str | dict[str, Any] = field(metadata={
        "help": "a Distiller schedule: the path of its YAML file (relative to the working directory), or inline"})
    tune: AgpTune = field(default_factory=AgpTune)
    reward: RewardForm = field(default="c_2_minus_c", metadata={
        "help": "c_2_minus_c or c_over_2_minus_c; size is the non-zero parameter count"})
    round_to: int = round_to_field()
    budget: Budget | None = budget_field()
