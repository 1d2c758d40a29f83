"""The search methods: a small explicit registry of name → (search-section schema, driver).

A method's `search:` section is validated against its schema dataclass. The driver is the code
that proposes candidates; a method whose driver is not built yet still validates and prepares a
run (data, teacher, run record) so configs can be written and checked ahead of it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from searchsvc.rewards import RewardForm
from storage.errors import SearchsvcError
from storage.records import did_you_mean

@dataclass(frozen=True)
class Method:
    name: str
    search_schema: type
    description: str
    driver: str | None = None  # "module:function", imported only when a run starts (validate stays light)

    def load_driver(self) -> Callable[..., Any] | None:
        """The driver function, or None for a method whose driver is not built yet."""
        if self.driver is None:
            return None
        module, _, name = self.driver.partition(":")
        return getattr(importlib.import_module(module), name)


_METHODS: dict[str, Method] = {}


def register_method(name: str, search_schema: type, description: str, driver: str | None = None) -> Method:
    """Add a method: its `search:` schema and its driver as "module:function"."""
    _METHODS[name] = Method(name, search_schema, description, driver)
    return _METHODS[name]


def list_methods() -> list[str]:
    """Registered method names."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name`; a SearchsvcError with a did-you-mean otherwise."""
    if name not in _METHODS:
        raise SearchsvcError(f"method: unknown method {name!r}{did_you_mean(name, _METHODS)}; "
                             f"choose one of {', '.join(list_methods())}")
    return _METHODS[name]


# ---- search sections --------------------------------------------------------------------------
@dataclass(frozen=True)
class GridCandidate:
    """One transformation: blocks to remove, a width multiplier, explicit widths (applied last)."""

    remove: tuple[str, ...] = field(default=(), metadata={"help": "block names, e.g. layer2.1"})
    scale: float | None = field(default=None, metadata={"gt": 0, "max": 1, "help": "multiplier on every width"})
    widths: dict[str, int] = field(default_factory=dict, metadata={"help": "width key → channels"})


@dataclass(frozen=True)
class GridSearch:
    """An explicit list of candidates."""

    candidates: tuple[GridCandidate, ...] = field(default=(GridCandidate(scale=0.5),),
                                                  metadata={"help": "the transformations to evaluate"})
    round_to: int = field(default=1, metadata={"min": 1, "help": "round channel counts up to a multiple"})
    reward: RewardForm = field(default="c_2_minus_c", metadata={"help": "c_2_minus_c or c_over_2_minus_c"})


@dataclass(frozen=True)
class N2NSearch:
    """Network-to-network compression by reinforcement learning (remove, then shrink layers)."""

    agent: Literal["ppo", "random"] = field(default="ppo", metadata={"help": "ppo, or random as the baseline"})
    max_evaluations: int = field(default=64, metadata={"min": 1, "help": "candidate evaluations, cache hits excluded"})
    time_budget_s: float | None = field(default=None, metadata={"gt": 0, "help": "stop after this many seconds"})
    target_compression: float | None = field(default=None, metadata={"gt": 1, "help": "stop at this x-factor"})
    reward: RewardForm = field(
        default="c_2_minus_c", metadata={"help": "C(2-C)·As/A (paper's code) or C·As/((2-C)·A) (paper's text)"})
    num_envs: int = field(default=4, metadata={"min": 1, "help": "candidates in flight at once (vector env size)"})
    iteration_evaluations: int = field(default=16, metadata={"min": 2, "help": "PPO train batch: steps per iteration"})
    shrink: bool = field(default=True, metadata={"help": "run the layer-shrinkage stage after removal"})
    shrink_share: float = field(default=0.4, metadata={"gt": 0, "lt": 1, "help": "share of the budget for shrinkage"})
    width_scales: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0),
                                            metadata={"help": "inner-width multipliers the shrink stage chooses from"})
    checkpoint_every: int = field(default=1, metadata={"min": 1, "help": "PPO iterations between checkpoints"})
    top_k: int = field(default=5, metadata={"min": 0, "help": "best networks to fine-tune at the end"})
    finetune_epochs: int = field(default=0, metadata={"min": 0, "help": "epochs of distillation for the top-k"})


@dataclass(frozen=True)
class TaylorStop:
    """The seed's stop rule: a trial ends at the first iteration that breaks either bound."""

    min_accuracy: float | None = field(default=None, metadata={"min": 0, "max": 1, "help": "stop below this"})
    max_drop: float = field(default=2.0, metadata={"min": 0, "help": "stop this many points below the teacher"})


@dataclass(frozen=True)
class LogRange:
    """A log-uniform range [low, high] (learning rates)."""

    low: float = field(metadata={"gt": 0, "help": "smallest value"})
    high: float = field(metadata={"gt": 0, "help": "largest value"})

    def __post_init__(self) -> None:
        if self.high < self.low:
            raise ValueError(f"high: must be at least low ({self.low}), got {self.high}")


@dataclass(frozen=True)
class TaylorTune:
    """The Ray Tune sweep: what the trials try, and how they are scheduled and stopped.

    Each key is a list of choices: every combination of the lists is one trial (a grid, so no two
    trials repeat each other's work); an empty list keeps the value of `search` / `train`. lr may
    instead be a {low, high} range: then each combination is tried with `num_samples` lr samples.
    """

    num_samples: int = field(default=1, metadata={"min": 1, "help": "lr samples per combination (lr a range)"})
    filters_per_iteration: tuple[int | float, ...] = field(default=(), metadata={"help": "choices"})
    lr: tuple[float, ...] | LogRange = field(default=(), metadata={"help": "fine-tune lr: choices or {low, high}"})
    epochs: tuple[int, ...] = field(default=(), metadata={"help": "fine-tune epochs per iteration: choices"})
    distill: tuple[bool, ...] = field(default=(), metadata={"help": "fine-tune with distillation: choices"})
    metric: Literal["reward", "accuracy"] = field(
        default="reward", metadata={"help": "per-iteration metric ASHA compares (reward weighs size and accuracy)"})
    grace_period: int = field(default=1, metadata={"min": 1, "help": "iterations before ASHA may stop a trial"})
    reduction_factor: int = field(default=2, metadata={"min": 2, "help": "ASHA keeps 1/reduction_factor per rung"})
    max_failures: int = field(default=2, metadata={"min": 0, "help": "restarts of a trial whose worker fails"})

    def __post_init__(self) -> None:
        for i, epochs in enumerate(self.epochs):
            if epochs < 1:
                raise ValueError(f"epochs[{i}]: must be a positive integer, got {epochs}")
        for i, lr in enumerate(self.lr if isinstance(self.lr, tuple) else ()):
            if lr <= 0:
                raise ValueError(f"lr[{i}]: must be a positive number, got {lr}")


@dataclass(frozen=True)
class TaylorSearch:
    """Iterative filter pruning ranked by first-order Taylor importance, one Tune trial per sample."""

    iterations: int = field(default=5, metadata={"min": 1, "help": "prune / fine-tune rounds per trial"})
    filters_per_iteration: int | float = field(default=0.1, metadata={
        "gt": 0, "help": "channels removed per round: a count, or a fraction (< 1) of the teacher's channels"})
    importance_batches: int = field(default=8, metadata={"min": 1, "help": "training batches averaged for importance"})
    stop: TaylorStop = field(default_factory=TaylorStop)
    tune: TaylorTune = field(default_factory=TaylorTune)
    reward: RewardForm = field(default="c_2_minus_c", metadata={"help": "c_2_minus_c or c_over_2_minus_c"})

    def __post_init__(self) -> None:
        for where, value in [("filters_per_iteration", self.filters_per_iteration),
                             *((f"tune.filters_per_iteration[{i}]", v)
                               for i, v in enumerate(self.tune.filters_per_iteration))]:
            if isinstance(value, float) and not 0 < value < 1:
                raise ValueError(f"{where}: a fraction must be in (0, 1), got {value} (write a count as an integer)")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{where}: a count must be a positive integer, got {value}")


@dataclass(frozen=True)
class AgpSearch:
    """Distiller-style gradual magnitude pruning driven by a YAML schedule."""

    schedule: str = field(default="", metadata={"help": "path of the Distiller schedule YAML"})
    num_samples: int = field(default=1, metadata={"min": 1, "help": "Tune trials"})


@dataclass(frozen=True)
class RigLSearch:
    """RigL dynamic sparse training."""

    dense_allocation: float = field(default=0.1, metadata={"gt": 0, "max": 1, "help": "fraction of weights kept"})
    delta: int = field(default=100, metadata={"min": 1, "help": "steps between mask updates"})
    alpha: float = field(default=0.3, metadata={"gt": 0, "max": 1, "help": "initial fraction updated"})
    t_end_fraction: float = field(default=0.75, metadata={"gt": 0, "max": 1, "help": "stop updates at this share"})
    distribution: Literal["uniform", "erk"] = field(default="uniform", metadata={"help": "per-layer density rule"})
    static_topo: bool = field(default=False, metadata={"help": "never change masks (static sparse baseline)"})
    num_samples: int = field(default=1, metadata={"min": 1, "help": "Tune trials"})


register_method("grid", GridSearch, "evaluate an explicit list of transformations", "searchsvc.grid:run_grid")
register_method("n2n", N2NSearch, "RLlib PPO agent removes and shrinks layers of the teacher",
                "searchsvc.n2n:run_n2n")
register_method("taylor", TaylorSearch, "iterative Taylor filter pruning as a Ray Tune sweep",
                "searchsvc.taylor:run_taylor")
register_method("agp", AgpSearch, "gradual magnitude pruning from a Distiller YAML schedule")
register_method("rigl", RigLSearch, "RigL dynamic sparse training")
