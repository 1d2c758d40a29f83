"""The method registry: one entry per search method, added by the method's own package (as timm registers models).

    @register_method("taylor", "iterative Taylor filter pruning as a Ray Tune sweep",
                     driver="searchsvc.methods.taylor.driver:run_taylor",
                     builder="workers.compression.taylor:taylor_step", residual_only=True, user_models=True)
    @dataclass(frozen=True)
    class TaylorSearch(SearchSection): ...

An entry carries everything the rest of searchsvc needs of a method: its `search:` schema, its checks at
validate, its driver (imported when a run starts: `validate` stays light) and its worker-side candidate builder
(handed to the workers with the run: `workers` never imports `searchsvc`). This module imports no method;
`searchsvc.methods` imports every method package, and with it registers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from core.names import load_object, lookup
from searchsvc.budget import Budget, measure_problems
from searchsvc.rewards import RewardForm
from workers.evaluation.spec import Builder

if TYPE_CHECKING:
    from searchsvc.config import JobConfig

Check = Callable[["JobConfig"], list[str]]  # a schema-valid config → the problems only this method knows about


class SearchSection:
    """What every method's `search:` schema is (a frozen dataclass deriving from this). A method that takes a
    deployment budget or a reward form declares them as fields; these class defaults stand in for the others."""

    budget: Budget | None = None
    reward: RewardForm = "c_2_minus_c"


def budget_field() -> Any:
    """`search.budget` of a method: the limits a deployed model must meet (searchsvc.budget)."""
    return field(default=None, metadata={"omit_default": True, "help": "deployment limits: macs, params, "
                                         "model_bytes, latency_ms with latency_batch, latency_backend (torch or "
                                         "onnxruntime), latency_threads (searchsvc/budget.py)"})


def round_to_field() -> Any:
    """`search.round_to` of a method that cuts channels: kept widths multiples of it (workers.models.surgery)."""
    return field(default=8, metadata={"min": 1, "help": "a channel group the teacher has wider than twice this "
                                      "keeps a multiple of it, one wider than this a multiple of half of it (int8 "
                                      "and bf16 kernels work on 4 to 16 channels; 1: any width)"})


@dataclass(frozen=True)
class Method:
    """A registered method: its schema, driver, worker-side builder and checks."""

    name: str
    search_schema: type[SearchSection]
    description: str
    driver: str  # "module:function": driver(context: RunContext), imported only when a run starts
    builder: str | None = None  # "module:function": the workers' builder of its candidates; None: surgery
    residual_only: bool = False  # needs a residual teacher (surgery on blocks and streams)
    check: Check | None = None  # beyond the schema, at validate
    user_models: bool = False  # takes the user's own network (teacher.model), cut through its traced graph
    cuts: bool = False  # removes units and channels of a user's network: checked at validate (`cut_problems`)

    def load_driver(self) -> Callable[..., Any]:
        """The driver function."""
        return load_object(self.driver)

    def worker_builder(self) -> Builder | None:
        """What the workers build this method's candidates with (None: surgery on the teacher)."""
        return Builder(self.name, self.builder) if self.builder else None

    def check_config(self, config: JobConfig) -> list[str]:
        """Problems of a schema-valid config that only this method knows about."""
        from workers.models.zoo import is_residual, list_models

        if config.teacher.model is not None and not self.user_models:
            takers = ", ".join(m.name for m in _METHODS.values() if m.user_models)
            return [f"teacher.model: method {self.name} does not take your own network yet; methods that do: {takers}"]
        arch = config.teacher.arch
        if self.residual_only and arch in list_models() and not is_residual(arch):
            return [f"teacher.arch: method {self.name} needs a residual network (resnet20, resnet56, "
                    f"resnet18_cifar, tiny_cnn); {arch} is a plain network (use method agp or rigl)"]
        cut = cut_problems(config) if self.cuts else []  # a network that cannot be cut: nothing else to say
        return measure_problems(config) + (cut or (self.check(config) if self.check else []))


_METHODS: dict[str, Method] = {}


def cut_problems(config: JobConfig) -> list[str]:
    """A user's network that cannot be cut and rebuilt exactly is refused here, with the layer and why, rather
    than searched into candidates that fail or that `load_candidate` and `export` could not load."""
    from workers.data.datasets import input_shape
    from workers.models.cutting import cut_problem
    from workers.models.user_model import check_outputs, construct

    shape = input_shape(config.dataset)
    if config.teacher.source is None or shape is None:
        return []
    model = construct(config.teacher.source)
    check_outputs(model, shape, num_classes=None, task=config.task)  # one that cannot run says so
    problem = cut_problem(model, construct(config.teacher.source), shape.example(model))
    return [f"teacher.model: {config.teacher.model} {problem}"] if problem else []


def register_method(name: str, description: str, *, driver: str, builder: str | None = None,
                    residual_only: bool = False, check: Check | None = None,
                    user_models: bool = False, cuts: bool = False) -> Callable[[type], type]:
    """Decorator of a method's `search:` schema: registers the method under `name`."""

    def register(schema: type) -> type:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, schema, description, driver, builder, residual_only, check, user_models, cuts)
        return schema

    return register


def list_methods() -> list[str]:
    """Registered method names."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method registered as `name`; a SearchsvcError with a did-you-mean otherwise."""
    return lookup(_METHODS, name, "method", key="method")
