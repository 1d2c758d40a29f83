"""`method: rigl` — RigL dynamic sparse training as a Ray Tune sweep: its `search:` schema, its check and
registration (the driver: driver.py; the worker's step: workers/compression/rigl.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from searchsvc.budget import Budget
from searchsvc.registry import SearchSection, budget_field, register_method
from searchsvc.rewards import RewardForm
from searchsvc.sweeps.schema import SweepTune

if TYPE_CHECKING:
    from searchsvc.config import JobConfig

Distribution = Literal["uniform", "erk"]


def check_rigl(config: JobConfig) -> list[str]:
    """A rigl job must leave some layer sparse: with linear layers kept dense and the first layer dense (as
    rigl-torch keeps it), a teacher needs a conv layer beyond its first: an MLP has none, nor has a vision
    transformer (a patch-embedding conv, then linear layers)."""
    from torch import nn

    from workers.models.user_model import construct
    from workers.models.zoo import PlainArch, list_models, model_arch, weight_layers

    if not config.search.ignore_linear_layers:
        return []
    arch, source = config.teacher.arch, config.teacher.source
    if source is not None:
        has_conv = any(isinstance(m, nn.Conv2d) for _, m in weight_layers(construct(source))[1:])
    else:
        family = model_arch(arch) if arch in list_models() else None
        has_conv = not (isinstance(family, PlainArch) and len(family.convs) < 2)
    if not has_conv:
        return [f"search.ignore_linear_layers: {config.teacher.base} has no conv layer beyond its first, and the "
                "first layer and linear layers stay dense, so nothing would be sparse; set it to false"]
    return []


@dataclass(frozen=True)
class RigLTune(SweepTune):
    """The RigL sweep: each combination of the lists is one trial; ASHA compares validation accuracy per epoch."""

    dense_allocation: tuple[float, ...] = field(default=(), metadata={"help": "density choices, each in (0, 1]"})
    delta: tuple[int, ...] = field(default=(), metadata={"help": "steps between mask updates: choices"})
    alpha: tuple[float, ...] = field(default=(), metadata={"help": "initial update fraction: choices"})
    distribution: tuple[Distribution, ...] = field(default=(), metadata={"help": "uniform / erk choices"})
    static_topo: tuple[bool, ...] = field(default=(), metadata={
        "help": "[false, true]: RigL and the static sparse baseline side by side"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, values, low in (("dense_allocation", self.dense_allocation, 0), ("alpha", self.alpha, 0)):
            for i, value in enumerate(values):
                if not low < value <= 1:
                    raise ValueError(f"{key}[{i}]: must be in (0, 1], got {value}")
        for i, value in enumerate(self.delta):
            if value < 1:
                raise ValueError(f"delta[{i}]: must be a positive number of steps, got {value}")


@register_method("rigl", "RigL dynamic sparse training as a Ray Tune sweep",
                 driver="searchsvc.methods.rigl.driver:run_rigl",
                 builder="workers.compression.rigl:rigl_step", check=check_rigl, user_models=True)
@dataclass(frozen=True)
class RigLSearch(SearchSection):
    """RigL dynamic sparse training (fixed non-zero budget, drop by magnitude, grow by gradient)."""

    dense_allocation: float = field(default=0.1, metadata={"gt": 0, "max": 1, "help": "fraction of weights kept"})
    delta: int = field(default=100, metadata={"min": 1, "help": "steps between mask updates"})
    alpha: float = field(default=0.3, metadata={"gt": 0, "max": 1, "help": "initial fraction updated"})
    t_end_fraction: float = field(default=0.75, metadata={"gt": 0, "max": 1, "help": "stop updates at this share"})
    distribution: Distribution = field(default="uniform", metadata={
        "help": "uniform (first layer dense) or erk (Erdős–Rényi-Kernel)"})
    ignore_linear_layers: bool = field(default=True, metadata={"help": "keep linear layers dense"})
    grad_accumulation_n: int = field(default=1, metadata={"min": 1, "help": "steps of dense gradient per regrowth"})
    static_topo: bool = field(default=False, metadata={"help": "never change masks (static sparse baseline)"})
    init: Literal["scratch", "teacher"] = field(default="scratch", metadata={
        "help": "scratch: fresh weights of the teacher's arch; teacher: start from its trained weights"})
    tune: RigLTune = field(default_factory=RigLTune)
    reward: RewardForm = field(default="c_2_minus_c", metadata={
        "help": "c_2_minus_c or c_over_2_minus_c; size is the non-zero parameter count"})
    budget: Budget | None = budget_field()

    def __post_init__(self) -> None:
        delta = min((self.delta, *self.tune.delta))  # every trial's delta must leave room for the accumulation
        if self.grad_accumulation_n >= max(delta, 2):
            raise ValueError(f"grad_accumulation_n: must be below delta ({delta}), got {self.grad_accumulation_n}")
