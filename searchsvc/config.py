"""Job configs: YAML (core.yamlio: safe types, no aliases, no duplicate keys) → frozen dataclasses, every problem
named by its key path."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from core.errors import SearchsvcError
from core.records import MAX_SEED, RecordError, from_data, to_data
from core.yamlio import load_yaml, read_text
from searchsvc.methods import get_method, list_methods
from searchsvc.registry import SearchSection
from storage import DEFAULT_STORE
from workers.compression.quantize import QuantizeConfig
from workers.data.datasets import DatasetConfig
from workers.evaluation.resources import Resources
from workers.training.task import TaskConfig
from workers.training.teacher import TeacherConfig
from workers.training.train import TrainConfig


class ConfigError(RecordError):
    """A config file that cannot be read or does not match the schema."""


def _search_schema(method: str) -> type[SearchSection] | None:
    """The `search:` schema of `method` (None for an unknown method: `method:` reports that itself)."""
    return get_method(method).search_schema if method in list_methods() else None


@dataclass(frozen=True)
class JobConfig:
    """One search job (DESIGN §3)."""

    method: str = field(metadata={"choices": list_methods, "help": "grid | n2n | taylor | agp | sensitivity | rigl"})
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    search: SearchSection | None = field(default=None, metadata={
        "schema_from": ("method", _search_schema), "help": "the method's own section"})
    train: TrainConfig = field(default_factory=TrainConfig)
    resources: Resources = field(default_factory=Resources)
    store: str = field(default=DEFAULT_STORE, metadata={"help": "folder, file:///abs/dir or s3://bucket/prefix"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: the GPU if any"})
    seed: int = field(default=0, metadata={"min": 0, "max": MAX_SEED, "help": "seed of the search"})
    quantize: QuantizeConfig | None = field(default=None, metadata={
        "omit_default": True, "help": "int8: every kept candidate also quantized and measured (docs/quantization.md)"})
    task: TaskConfig | None = field(default=None, metadata={
        "omit_default": True, "help": "your own loss, metric and prediction (workers/training/task.py); null: "
                                      "classification with cross-entropy and top-1 accuracy"})

    def __post_init__(self) -> None:
        # The teacher and every candidate train on the task and are judged by it: it travels in their recipes
        # (so in the teacher's and every candidate's hash, left out when it is the default).
        task = None if self.task is None or self.task.default else self.task
        for section in ("train", "teacher"):
            given = getattr(self, section).task
            if given is not None and given != task:
                raise ValueError(f"{section}.task: set from the top-level task: section; write the task there")
            object.__setattr__(self, section, dataclasses.replace(getattr(self, section), task=task))


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (values parsed as YAML: 3 → int, true → bool, [1, 2] → list)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {item!r}: expected key.path=value"])
        try:
            value = load_yaml(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError([f"--set {key}: value {text!r} is not valid YAML"]) from None
        node = raw
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"--set {key}: {'.'.join(parts[: depth + 1])} is not a mapping"])
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError naming the file (and line) otherwise."""
    path = Path(path)
    try:
        text = read_text(path)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as err:
        raise ConfigError([f"{path}: cannot read ({err.__class__.__name__})"]) from None
    except OSError as err:  # a folder, no permission, a path through a file, a name too long, ...
        raise ConfigError([f"{path}: cannot read ({err.__class__.__name__}: {err.strerror})"]) from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}{where}: invalid YAML: {problem}"]) from None
    if raw is None:
        raise ConfigError([f"{path}: the file is empty"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys (method:, dataset:, ...)"])
    return raw


def parse_config(raw: dict[str, Any], source: str = "") -> JobConfig:
    """Validate plain data into a JobConfig; ConfigError lists every problem with its key path."""
    problems: list[str] = []
    config = None
    try:
        config = from_data(JobConfig, raw)
    except RecordError as err:
        problems.extend(err.problems)
    if config is not None and config.dataset.val_fraction == 0:
        problems.append("dataset.val_fraction: must be above 0: validation accuracy decides every choice (rewards, "
                        "stop rules, ranking); test accuracy only reports")
    if not problems and config.teacher.source is not None:  # before any check builds it in this process
        problems.extend(_user_code_problems(config.teacher.source))
    if not problems and config.dataset.factory is not None:  # its module imported in a child first
        problems.extend(_dataset_factory_problems(config.dataset.factory))
    if not problems and config.task is not None:
        problems.extend(_task_problems(config.task))
    if not problems:
        problems.extend(get_method(config.method).check_config(config))
    if problems:
        raise ConfigError(problems, source)
    return config


def _user_code_problems(source: Any) -> list[str]:
    """The user's model module and factory tried in a child process first: one that exits or kills its
    process ends the child (workers.models.user_model.try_in_a_child)."""
    from workers.models.user_model import try_in_a_child

    try:
        try_in_a_child(source)
    except SearchsvcError as err:
        return [str(err)]
    return []


def _task_problems(task: TaskConfig) -> list[str]:
    """The task's loss imports, and its metric is made from its keyword arguments as a torchmetrics Metric (at
    validate: a metric that cannot be made stops the run before a teacher trains)."""
    from core.user_code import import_module_safely
    from workers.training.task import Task, as_reference

    try:
        for key, name in (("task.loss", task.loss), ("task.metric", task.metric)):
            module, sep, _ = as_reference(name or "").partition(":")
            if sep and module:  # a module that exits or hangs on import ends a child, not this process
                import_module_safely(module, key)
        Task(task).metric()
    except SearchsvcError as err:
        return [str(err)]
    return []


def _dataset_factory_problems(factory: str) -> list[str]:
    """dataset.factory names a callable whose module imports (tried in a child process first); it is called
    when the run reads its data, not here."""
    from workers.data.python_source import factory_of

    try:
        factory_of(factory)
    except SearchsvcError as err:
        return [str(err)]
    return []


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    """Read, override and validate a job config file. A relative `teacher.weights` is relative to the
    config file's folder (where the user keeps the two together), made absolute here."""
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        config = parse_config(raw, source=str(path))
    except ConfigError as err:
        raise ConfigError(err.problems, str(path)) from None
    weights = config.teacher.weights
    if weights is not None and "://" not in weights and not Path(weights).is_absolute():
        weights = str((Path(path).resolve().parent / weights))
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, weights=weights))
    problems = _user_model_problems(config)
    if problems:
        raise ConfigError(problems, str(path))
    return config


def _user_model_problems(config: JobConfig) -> list[str]:
    """What `validate` can tell of the user's own network without building it: its constructor imports, its
    local weights file exists."""
    from workers.models.user_model import constructor

    problems = []
    if config.teacher.model is not None:
        try:
            constructor(config.teacher.model)
        except SearchsvcError as err:
            problems.append(str(err))
    weights = config.teacher.weights
    if weights is not None and "://" not in weights and not Path(weights).is_file():
        problems.append(f"teacher.weights: {weights}: no such file")
    return problems


def config_to_yaml(config: JobConfig) -> str:
    """The resolved config as YAML (every default filled in), as stored in runs/<id>/config.yaml."""
    header = "# resolved searchsvc job config: every default filled in\n"
    return header + yaml.safe_dump(to_data(config), sort_keys=False, default_flow_style=False)


__all__ = ["ConfigError", "JobConfig", "Resources", "SearchsvcError", "apply_overrides", "config_to_yaml",
           "load_config", "parse_config", "read_yaml"]
