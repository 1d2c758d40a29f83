"""The search methods: a small explicit registry of name → (search-section schema, driver).

A method's `search:` section is validated against its schema dataclass. The driver is the code that
proposes candidates, named "module:function" and imported when a run starts (`validate` stays light).
To add a method: a schema dataclass, a driver `run_x(context: RunContext)`, one `register_method` line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from core.errors import SearchsvcError
from core.names import is_number, load_object, lookup
from searchsvc.budget import Budget, measure_problems
from searchsvc.rewards import RewardForm


def budget_field() -> Any:
    """`search.budget` of a method: the limits a deployed model must meet (searchsvc.budget)."""
    return field(default=None, metadata={"omit_default": True, "help": "deployment limits: macs, params, "
                                         "model_bytes, latency_ms with latency_batch, latency_backend (torch or "
                                         "onnxruntime), latency_threads (searchsvc/budget.py)"})


@dataclass(frozen=True)
class Method:
    name: str
    search_schema: type
    description: str
    driver: str  # "module:function", imported only when a run starts (validate stays light)
    residual_only: bool = False  # needs a residual teacher (surgery on blocks and streams)
    check: str | None = None  # "module:function": JobConfig → problems, beyond the schema (at validate)
    user_models: bool = False  # takes the user's own network (teacher.model), cut through its traced graph

    def load_driver(self) -> Callable[..., Any]:
        """The driver function."""
        return load_object(self.driver)

    def check_config(self, config: Any) -> list[str]:
        """Problems of a schema-valid config that only this method knows about."""
        from workers.models.zoo import is_residual, list_models

        if config.teacher.model is not None and not self.user_models:
            takers = ", ".join(m.name for m in _METHODS.values() if m.user_models)
            return [f"teacher.model: method {self.name} does not take your own network yet; methods that do: {takers}"]
        arch = config.teacher.arch
        if self.residual_only and arch in list_models() and not is_residual(arch):
            return [f"teacher.arch: method {self.name} needs a residual network (resnet20, resnet56, "
                    f"resnet18_cifar, tiny_cnn); {arch} is a plain network (use method agp or rigl)"]
        problems = measure_problems(config)
        return problems + (load_object(self.check)(config) if self.check else [])


_METHODS: dict[str, Method] = {}


def register_method(name: str, search_schema: type, description: str, driver: str,
                    residual_only: bool = False, check: str | None = None, user_models: bool = False) -> Method:
    """Add a method: its `search:` schema, its driver and config check as "module:function"."""
    _METHODS[name] = Method(name, search_schema, description, driver, residual_only, check, user_models)
    return _METHODS[name]


def list_methods() -> list[str]:
    """Registered method names."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name`; a SearchsvcError with a did-you-mean otherwise."""
    return lookup(_METHODS, name, "method", key="method")


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
    budget: Budget | None = budget_field()


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
    budget: Budget | None = budget_field()
    reward_size: Literal["params", "macs", "latency_ms"] = field(default="params", metadata={
        "omit_default": True, "help": "what the reward's compression C = 1 - size/teacher's counts: params, macs, "
                                      "or latency_ms (at the budget's latency setting, else torch at batch 1)"})


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
class SweepTune:
    """What every Tune sweep shares: the lr to try, ASHA's rungs, restarts of failed trials.

    Each method adds its own keys as lists of choices: every combination of the lists is one trial
    (a grid, so no two trials repeat each other's work); an empty list keeps the value of `search` /
    `train`. lr may instead be a {low, high} range: each combination then gets `num_samples` lr draws.
    """

    num_samples: int = field(default=1, metadata={"min": 1, "help": "lr samples per combination (lr a range)"})
    lr: tuple[float, ...] | LogRange = field(default=(), metadata={"help": "lr: choices or {low, high}"})
    grace_period: int = field(default=1, metadata={"min": 1, "help": "iterations / epochs before ASHA may stop a trial"})
    reduction_factor: int = field(default=2, metadata={"min": 2, "help": "ASHA keeps 1/reduction_factor per rung"})
    max_failures: int = field(default=2, metadata={"min": 0, "help": "restarts of a trial whose worker fails"})

    def __post_init__(self) -> None:
        for i, lr in enumerate(self.lr if isinstance(self.lr, tuple) else ()):
            if lr <= 0:
                raise ValueError(f"lr[{i}]: must be a positive number, got {lr}")


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
        for i, epochs in enumerate(self.epochs):
            if epochs < 1:
                raise ValueError(f"epochs[{i}]: must be a positive integer, got {epochs}")


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
    budget: Budget | None = budget_field()

    def __post_init__(self) -> None:
        for where, value in [("filters_per_iteration", self.filters_per_iteration),
                             *((f"tune.filters_per_iteration[{i}]", v)
                               for i, v in enumerate(self.tune.filters_per_iteration))]:
            if isinstance(value, float) and not 0 < value < 1:
                raise ValueError(f"{where}: a fraction must be in (0, 1), got {value} (write a count as an integer)")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{where}: a count must be a positive integer, got {value}")


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
        for key, values in (("ending_epoch", self.ending_epoch), ("epochs", self.epochs)):
            for i, value in enumerate(values):
                if value < 1:
                    raise ValueError(f"{key}[{i}]: must be a positive integer, got {value}")


@dataclass(frozen=True)
class AgpSearch:
    """Distiller-style gradual pruning from a YAML schedule, thinned afterwards; one Tune trial per sample."""

    schedule: str | dict[str, Any] = field(metadata={
        "help": "a Distiller schedule: the path of its YAML file (relative to the working directory), or inline"})
    tune: AgpTune = field(default_factory=AgpTune)
    reward: RewardForm = field(default="c_2_minus_c", metadata={
        "help": "c_2_minus_c or c_over_2_minus_c; size is the non-zero parameter count"})
    budget: Budget | None = budget_field()


@dataclass(frozen=True)
class SensitivitySearch:
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


Distribution = Literal["uniform", "erk"]


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


@dataclass(frozen=True)
class RigLSearch:
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


def check_rigl(config: Any) -> list[str]:
    """A rigl job must leave some layer sparse: a teacher of nothing but linear layers (an MLP) has none."""
    from torch import nn

    from workers.models.user_model import construct
    from workers.models.zoo import PlainArch, list_models, model_arch

    if not config.search.ignore_linear_layers:
        return []
    arch, source = config.teacher.arch, config.teacher.source
    if source is not None:
        has_conv = any(isinstance(m, nn.Conv2d) for m in construct(source).modules())
    else:
        family = model_arch(arch) if arch in list_models() else None
        has_conv = not (isinstance(family, PlainArch) and not family.convs)
    if not has_conv:
        return [f"search.ignore_linear_layers: {config.teacher.base} has only linear layers, so nothing would be "
                "sparse; set it to false"]
    return []


def check_n2n(config: Any) -> list[str]:
    """n2n on a user's network needs a block to remove: traced here, at validate, when the data's shape is known."""
    from workers.data.datasets import input_shape
    from workers.models.structure import structure_of
    from workers.models.user_model import check_outputs, construct

    shape = input_shape(config.dataset)
    if config.teacher.source is None or shape is None:
        return []
    model = construct(config.teacher.source)
    check_outputs(model, *shape, num_classes=None)  # a model that cannot take the data says so first
    if not structure_of(model, *shape).names:
        return [f"teacher.model: method n2n removes blocks, and {config.teacher.model} has none that can go (a block "
                f"whose input and output shapes match, with a skip connection); use method grid or taylor"]
    return []


def check_sensitivity(config: Any) -> list[str]:
    """The weights a sensitivity analysis names exist in the teacher's network (a user's network's channel
    groups traced on the data's shape, when the config tells it)."""
    from searchsvc.methods.agp.variants import base_model
    from searchsvc.methods.sensitivity.driver import analysed_weights
    from workers.data.datasets import input_shape
    from workers.models.depgraph import example_input

    model, shape = base_model(config.teacher), input_shape(config.dataset)
    if shape is None and config.teacher.source is not None and config.search.structure == "filter":
        return []  # traced at run time, on the data's own shape
    try:
        analysed_weights(model, config.search, example_input(model, *shape) if shape else None)
    except SearchsvcError as err:
        return [str(err)]
    return []


register_method("grid", GridSearch, "evaluate an explicit list of transformations", "searchsvc.methods.grid.driver:run_grid",
                residual_only=True, user_models=True)
register_method("n2n", N2NSearch, "RLlib PPO agent removes and shrinks layers of the teacher",
                "searchsvc.methods.n2n.driver:run_n2n", residual_only=True, check="searchsvc.registry:check_n2n", user_models=True)
register_method("taylor", TaylorSearch, "iterative Taylor filter pruning as a Ray Tune sweep",
                "searchsvc.methods.taylor.driver:run_taylor", residual_only=True, user_models=True)
register_method("agp", AgpSearch, "gradual pruning from a Distiller YAML schedule, then thinning, as a Tune sweep",
                "searchsvc.methods.agp.driver:run_agp", check="searchsvc.methods.agp.variants:check_agp", user_models=True)
register_method("sensitivity", SensitivitySearch, "prune each layer alone to each level (searchsvc sensitivity)",
                "searchsvc.methods.sensitivity.driver:run_sensitivity", check="searchsvc.registry:check_sensitivity", user_models=True)
register_method("rigl", RigLSearch, "RigL dynamic sparse training as a Ray Tune sweep", "searchsvc.methods.rigl.driver:run_rigl",
                check="searchsvc.registry:check_rigl", user_models=True)
