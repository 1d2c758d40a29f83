"""Distiller-style compression schedules: the YAML file, and the scheduler that runs it in training.

    version: 1
    pruners:
      conv1_pruner: {class: AutomatedGradualPruner, initial_sparsity: 0.15, final_sparsity: 0.3,
                     weights: [module.conv1.weight]}
    lr_schedulers:
      pruning_lr: {class: StepLR, step_size: 30, gamma: 0.1}
    regularizers:                # workers/compression/regularizers.py: a penalty added to the loss
      filters_lasso: {class: GroupLassoRegularizer, reg_regims: {module.conv1.weight: [0.0008, Filters]}}
    quantizers:                  # workers/compression/qat.py: quantization-aware training, ending in an int8 model
      linear_quantizer: {class: QuantAwareTrainRangeLinearQuantizer, bits_activations: 8, bits_weights: 8}
    policies:
      - pruner: {instance_name: conv1_pruner}
        starting_epoch: 1        # epochs count from 0, as in Distiller
        ending_epoch: 100        # exclusive
        frequency: 2             # or, instead of the three: epochs: [0, 5, 10]
      - lr_scheduler: {instance_name: pruning_lr}
        starting_epoch: 1
        ending_epoch: 100
        frequency: 1

The scheduler hooks into `train_model` (a `TrainCallback`): a pruner's masks are computed at the
beginning of each of its policy's epochs and multiplied into the weights after every optimizer step,
so pruned weights stay exactly zero; an lr scheduler steps at the end of each of its epochs (and the
recipe's one-cycle schedule is then replaced by a constant rate); a regularizer adds its penalty to every
step's loss in its epochs and, with `threshold_criteria`, zeros the groups below its strength at their end;
a quantizer fake-quantizes the layers from its policy's first epoch to the end of training.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import yaml
from torch import nn

from core.names import did_you_mean, is_int
from core.records import RecordError, from_data
from core.yamlio import load_yaml, read_text
from workers.compression.pruners import ANY, Masks, PolicyStep, Pruner, StructuredAGP, prunable_weights, pruner_classes
from workers.compression.qat import QUANTIZERS, FakeQuantized, LinearQuantAwareTraining
from workers.compression.regularizers import REGULARIZERS, Regularizer, shape_problems
from workers.models.thinning import group_of_weight
from workers.training.train import TrainCallback

LR_SCHEDULERS = ("StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR", "ConstantLR",
                 "PolynomialLR")  # torch.optim.lr_scheduler classes whose arguments are plain numbers
_POLICY_KINDS = ("pruner", "lr_scheduler", "regularizer", "quantizer")
_TOP_KEYS = ("version", "pruners", "lr_schedulers", "regularizers", "quantizers", "policies")


class ScheduleError(RecordError):
    """A schedule file that cannot run: every problem with its key path."""


@dataclass(frozen=True)
class Policy:
    """When one pruner or lr scheduler acts: the epochs (from 0) and Distiller's start / end / frequency."""

    kind: str  # "pruner", "lr_scheduler", "regularizer" or "quantizer"
    instance: str
    epochs: tuple[int, ...]
    starting: int
    ending: int  # exclusive
    frequency: int

    def step(self, epoch: int) -> PolicyStep:
        return PolicyStep(epoch, self.starting, self.ending, self.frequency)


@dataclass(frozen=True)
class Schedule:
    """A parsed, validated schedule; `raw` is the mapping it came from (what is stored and hashed)."""

    raw: dict[str, Any]
    pruners: dict[str, Pruner]
    lr_schedulers: dict[str, tuple[str, dict[str, Any]]]  # name → (torch class name, keyword arguments)
    policies: tuple[Policy, ...]
    regularizers: dict[str, Regularizer] = dataclasses.field(default_factory=dict)
    quantizers: dict[str, LinearQuantAwareTraining] = dataclasses.field(default_factory=dict)

    def quantizer(self) -> tuple[LinearQuantAwareTraining, int] | None:
        """The quantizer a policy runs, and the epoch it starts in; None without one (at most one: validated)."""
        policy = next((p for p in self.policies if p.kind == "quantizer"), None)
        return None if policy is None else (self.quantizers[policy.instance], policy.epochs[0])

    def last_epoch(self) -> int:
        """The last epoch any policy acts in (training shorter than this stops the schedule early)."""
        return max((max(p.epochs) for p in self.policies if p.epochs), default=0)


def load_schedule(path: str, model: nn.Module | None = None, example: torch.Tensor | None = None) -> Schedule:
    """Read and validate a schedule file (core.yamlio); ScheduleError naming the file and key."""
    try:
        raw = load_yaml(read_text(path))
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or "not UTF-8 text"
        raise ScheduleError([f"cannot read the schedule: {why}"], path) from None
    except yaml.YAMLError as err:
        raise ScheduleError([f"invalid YAML: {str(err).splitlines()[0]}"], path) from None
    return parse_schedule(raw, model, source=path, example=example)


def parse_schedule(raw: Any, model: nn.Module | None = None, source: str = "schedule",
                   example: torch.Tensor | None = None) -> Schedule:
    """Validate a schedule mapping; with `model`, also that every weight it names exists there (a structured
    pruner's weights on a user's network are checked against its channel groups, traced on `example`)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ScheduleError(["the schedule must be a mapping with version, pruners, lr_schedulers, policies"], source)
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown or unsupported section{did_you_mean(key, _TOP_KEYS)}; "
                            f"supported: {', '.join(_TOP_KEYS)}")
    if raw.get("version") != 1:
        problems.append(f"version: must be 1, got {raw.get('version')!r}")
    pruners = {name: _pruner(name, settings, model, problems, example)
               for name, settings in _sections(raw, "pruners", problems).items()}
    schedulers = {name: _lr_scheduler(name, settings, problems)
                  for name, settings in _sections(raw, "lr_schedulers", problems).items()}
    regularizers = {name: _regularizer(name, settings, model, problems)
                    for name, settings in _sections(raw, "regularizers", problems).items()}
    quantizers = {name: _quantizer(name, settings, model, problems)
                  for name, settings in _sections(raw, "quantizers", problems).items()}
    policies = []
    raw_policies = raw.get("policies") or []
    if not isinstance(raw_policies, list):
        problems.append("policies: must be a list")
        raw_policies = []
    for index, entry in enumerate(raw_policies):
        policy = _policy(f"policies[{index}]", entry,
                         {"pruner": pruners, "lr_scheduler": schedulers, "regularizer": regularizers,
                          "quantizer": quantizers}, problems)
        if policy is not None:
            policies.append(policy)
    if sum(p.kind == "quantizer" for p in policies) > 1:
        problems.append("policies: at most one quantizer policy (one int8 model per candidate)")
    if problems:
        raise ScheduleError(problems, source)
    return Schedule(raw, pruners, schedulers, tuple(policies), regularizers, quantizers)  # no None: each a problem


def _sections(raw: dict, key: str, problems: list[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a mapping of instance name → settings")
        return {}
    return value


def _pruner(name: str, settings: Any, model: nn.Module | None, problems: list[str],
            example: torch.Tensor | None) -> Pruner | None:
    where = f"pruners.{name}"
    if not isinstance(settings, dict) or "class" not in settings:
        problems.append(f"{where}.class: missing (one of {', '.join(sorted(pruner_classes()))})")
        return None
    classes = pruner_classes()
    cls_name = settings["class"]
    if cls_name not in classes:
        problems.append(f"{where}.class: unknown pruner {cls_name!r}{did_you_mean(cls_name, classes)}; "
                        f"known: {', '.join(sorted(classes))}")
        return None
    try:
        pruner = from_data(classes[cls_name], {k: v for k, v in settings.items() if k != "class"}, path=where)
    except RecordError as err:
        problems.extend(err.problems)
        return None
    if model is not None:
        problems.extend(_unknown_weights(where, pruner, model, example))
    return pruner


def _unknown_weights(where: str, pruner: Pruner, model: nn.Module, example: torch.Tensor | None) -> list[str]:
    """Names the model does not have (or, for a structured pruner, that are not filter weights)."""
    if isinstance(pruner, StructuredAGP) and not hasattr(model, "arch") and example is None:
        return [f"{where}.class: structured pruning of your own network traces it on the data's image shape; "
                f"set dataset.image_size"]
    allowed = list(group_of_weight(model, example)) if isinstance(pruner, StructuredAGP) else prunable_weights(model)
    field = "weights" if hasattr(pruner, "weights") else "levels" if hasattr(pruner, "levels") else "thresholds"
    kind = "a prunable filter weight" if isinstance(pruner, StructuredAGP) else "a conv or linear weight"
    model_name = getattr(getattr(model, "arch", None), "name", type(model).__name__)
    index = (lambda i, _name: f"[{i}]") if field == "weights" else (lambda _i, name: f".{name}")
    return [f"{where}.{field}{index(i, name)}: {name!r} is not {kind} of {model_name}{did_you_mean(name, allowed)}"
            for i, name in enumerate(pruner.targets()) if name != ANY and name not in allowed]


def _regularizer(name: str, settings: Any, model: nn.Module | None, problems: list[str]) -> Regularizer | None:
    where = f"regularizers.{name}"
    regularizer = _instance(where, "regularizer", REGULARIZERS, settings, problems)
    if regularizer is not None and model is not None:
        problems.extend(shape_problems(where, regularizer, model))
    return regularizer


def _quantizer(name: str, settings: Any, model: nn.Module | None,
               problems: list[str]) -> LinearQuantAwareTraining | None:
    where = f"quantizers.{name}"
    quantizer = _instance(where, "quantizer", QUANTIZERS, settings, problems)
    if quantizer is not None and model is not None:
        problems.extend(f"{where}.overrides.{p}: matches no module of the model" for p in quantizer.unmatched(model))
    return quantizer


def _instance(where: str, kind: str, classes: dict[str, type], settings: Any, problems: list[str]) -> Any:
    """A schedule instance of one of `classes` (by its `class:`), its keys checked as a record; None after
    recording what is wrong."""
    cls_name = settings.get("class") if isinstance(settings, dict) else None
    if cls_name not in classes:
        problems.append(f"{where}.class: {kind} {cls_name!r} is not supported{did_you_mean(cls_name or '', classes)}; "
                        f"supported: {', '.join(classes)}")
        return None
    try:
        return from_data(classes[cls_name], {k: v for k, v in settings.items() if k != "class"}, path=where)
    except RecordError as err:
        problems.extend(err.problems)
        return None


def _lr_scheduler(name: str, settings: Any, problems: list[str]) -> tuple[str, dict[str, Any]] | None:
    where = f"lr_schedulers.{name}"
    if not isinstance(settings, dict) or settings.get("class") not in LR_SCHEDULERS:
        got = settings.get("class") if isinstance(settings, dict) else None
        problems.append(f"{where}.class: must be one of {', '.join(LR_SCHEDULERS)}, got {got!r}"
                        f"{did_you_mean(got or '', LR_SCHEDULERS)}")
        return None
    cls = getattr(torch.optim.lr_scheduler, settings["class"])
    accepted = set(inspect.signature(cls).parameters) - {"optimizer", "last_epoch", "verbose"}
    kwargs = {k: v for k, v in settings.items() if k != "class"}
    bad = [k for k in kwargs if k not in accepted]
    for key in bad:
        problems.append(f"{where}.{key}: {settings['class']} has no such argument{did_you_mean(key, accepted)}")
    try:
        cls(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)  # let torch check the values
    except (TypeError, ValueError) as err:
        if not bad:
            problems.append(f"{where}: {err}")
        return None
    return settings["class"], kwargs


def _policy(where: str, entry: Any, instances: dict[str, dict], problems: list[str]) -> Policy | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    kinds = [k for k in _POLICY_KINDS if k in entry]
    unknown = [k for k in entry if k not in (*_POLICY_KINDS, "starting_epoch", "ending_epoch", "frequency", "epochs")]
    for key in unknown:
        problems.append(f"{where}.{key}: unknown or unsupported policy key (supported kinds: "
                        f"{', '.join(_POLICY_KINDS)})")
    if len(kinds) != 1:
        if not unknown:
            problems.append(f"{where}: needs exactly one of {', '.join(k + ':' for k in _POLICY_KINDS)}")
        return None
    kind = kinds[0]
    ref = entry[kind]
    name = ref.get("instance_name") if isinstance(ref, dict) else None
    if name not in instances[kind]:
        known = ", ".join(sorted(instances[kind])) or "none defined"
        problems.append(f"{where}.{kind}.instance_name: no {kind} named {name!r} (defined: {known})")
        return None
    epochs = _epochs(where, entry, problems)
    if epochs is None:
        return None
    if "epochs" in entry:
        return Policy(kind, name, epochs, epochs[0], epochs[-1] + 1, 1)
    return Policy(kind, name, epochs, entry["starting_epoch"], entry["ending_epoch"], entry.get("frequency", 1))


def _epochs(where: str, entry: dict, problems: list[str]) -> tuple[int, ...] | None:
    """The epochs a policy acts in, or None after recording what is wrong."""
    def natural(value: Any) -> bool:
        return is_int(value) and value >= 0

    if "epochs" in entry:
        epochs = entry["epochs"]
        if not isinstance(epochs, list) or not epochs or not all(natural(e) for e in epochs):
            problems.append(f"{where}.epochs: must be a non-empty list of epoch numbers (>= 0), got {epochs!r}")
            return None
        return tuple(sorted(set(epochs)))
    start, end, frequency = entry.get("starting_epoch"), entry.get("ending_epoch"), entry.get("frequency", 1)
    before = len(problems)
    if not natural(start):
        problems.append(f"{where}.starting_epoch: must be an epoch number (>= 0), got {start!r}")
    if not natural(end):
        problems.append(f"{where}.ending_epoch: must be an epoch number (>= 0), got {end!r}")
    elif natural(start) and end <= start:
        problems.append(f"{where}.ending_epoch: must be after starting_epoch ({start}), got {end}")
    if not natural(frequency) or frequency < 1:
        problems.append(f"{where}.frequency: must be a positive integer, got {frequency!r}")
    if len(problems) > before:
        return None
    return tuple(range(start, end, frequency))


class CompressionScheduler(TrainCallback):
    """Runs a schedule inside `train_model`: Distiller's callbacks, with resumable state."""

    def __init__(self, schedule: Schedule, model: nn.Module, example: torch.Tensor | None = None) -> None:
        """`example`: an input of the model's shape, which a user's network needs for structured pruning (its
        channel groups are traced, once, here)."""
        self.schedule = schedule
        self.model = model
        structured = any(isinstance(p, StructuredAGP) for p in schedule.pruners.values())
        self.groups = group_of_weight(model, example) if structured else None
        self.masks: Masks = {}
        self.lr: dict[str, Any] = {}
        self.controls_lr = any(p.kind == "lr_scheduler" for p in schedule.policies)
        self.fake: FakeQuantized | None = None  # the quantizer's fake quantization, once its policy started

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int = 0) -> None:
        self.model = model
        self.lr = {name: getattr(torch.optim.lr_scheduler, cls)(optimizer, **kwargs)
                   for name, (cls, kwargs) in self.schedule.lr_schedulers.items()}

    def on_epoch_begin(self, epoch: int) -> None:
        """New masks from every pruner whose policy acts this epoch, applied at once; fake quantization from
        the quantizer policy's first epoch on."""
        quantizer = self.schedule.quantizer()
        if quantizer is not None and epoch >= quantizer[1] and self.fake is None:
            self.fake = FakeQuantized(self.model, quantizer[0])
        for policy in self.schedule.policies:
            if policy.kind == "pruner" and epoch in policy.epochs:
                self.masks.update(self.schedule.pruners[policy.instance].masks(self.model, policy.step(epoch),
                                                                              self.groups))
        self.apply_masks()

    def before_backward_pass(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss plus the penalty of every regularizer whose policy acts this epoch."""
        active = self._active("regularizer", epoch)
        if not active:
            return loss
        params = dict(self.model.named_parameters())
        return loss + sum(self.schedule.regularizers[name].loss(params) for name in active)

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None:
        self.apply_masks()  # after optimizer.step(): momentum and weight decay cannot revive a pruned weight

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        for name in self._active("lr_scheduler", epoch):
            self.lr[name].step()
        params = dict(self.model.named_parameters())
        for name in self._active("regularizer", epoch):  # threshold_criteria: small groups zeroed, kept zero
            for weight, mask in self.schedule.regularizers[name].threshold_masks(params).items():
                self.masks[weight] = mask if weight not in self.masks else self.masks[weight] * mask.to(
                    self.masks[weight].device)
        self.apply_masks()
        record["sparsity"] = self.sparsity()
        for name, regularizer in self.schedule.regularizers.items():
            record[f"group_sparsity.{name}"] = regularizer.group_sparsity(params)

    def _active(self, kind: str, epoch: int) -> list[str]:
        """The instances of `kind` whose policy acts in `epoch`."""
        return [p.instance for p in self.schedule.policies if p.kind == kind and epoch in p.epochs]

    @torch.no_grad()
    def apply_masks(self) -> None:
        if not self.masks:
            return
        params = dict(self.model.named_parameters())
        names = list(self.masks)
        for name in names:  # masks follow their weights across devices (the model may move once)
            if self.masks[name].device != params[name].device:
                self.masks[name] = self.masks[name].to(params[name].device)
        torch._foreach_mul_([params[n] for n in names], [self.masks[n] for n in names])

    def sparsity(self) -> float:
        """Zeros among the masked weights (0..1): what the schedule has pruned so far."""
        total = sum(m.numel() for m in self.masks.values())
        return float(sum(int((m == 0).sum()) for m in self.masks.values()) / total) if total else 0.0

    def finish_quantization(self) -> LinearQuantAwareTraining | None:
        """After training: the layers back to their float forward; the quantizer that trained them, if any."""
        if self.fake is None:
            return None
        self.fake.detach()
        self.fake = None
        return self.schedule.quantizer()[0]

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool, CPU), lr scheduler states and the fake quantizers' ranges: what a checkpoint must keep
        to resume the schedule."""
        return {"masks": {k: v.detach().bool().cpu() for k, v in self.masks.items()},
                "lr_schedulers": {k: s.state_dict() for k, s in self.lr.items()},
                "fake_quant": None if self.fake is None else self.fake.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        self.masks = {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in state["masks"].items()}
        for name, sched_state in state.get("lr_schedulers", {}).items():
            self.lr[name].load_state_dict(sched_state)
        if state.get("fake_quant") is not None:  # quantization-aware training had begun: on again, same ranges
            self.fake = self.fake or FakeQuantized(self.model, self.schedule.quantizer()[0])
            self.fake.load_state_dict(state["fake_quant"])
