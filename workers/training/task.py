"""The task a network is trained and judged on: its loss, its metric (the score every decision reads), and which
of its outputs is the prediction.

    task:
      loss: package.module:function      # loss(outputs, targets) -> scalar tensor; default cross-entropy
      metric: torchmetrics.classification.MulticlassJaccardIndex   # a torchmetrics Metric class, or
                                         # package.module:factory returning one; default top-1 accuracy
      metric_kwargs: {num_classes: 4}
      higher_is_better: true             # false for an error rate: the score is 1 - the metric
      output: out                        # a dict output's key (or a tuple's index) holding the prediction
      distill_on: prediction             # prediction | outputs: what a student matches of the teacher's outputs

The default task is classification exactly as before (cross-entropy with `train.label_smoothing`, top-1 by argmax):
a config without `task:` keeps every stored hash. With a task, the metric's value on the validation split decides
(rewards, ASHA, stop rules, budgets' "most accurate") and on the test split reports; it is stored in the columns
`val_accuracy` and `accuracy` (the names stay, so old stores and every reader keep working; the report names the
metric). A score is a fraction in [0, 1], higher better — what rewards (a ratio to the teacher's), stop rules in
points and every table assume: a metric where lower is better (an error rate, `higher_is_better: false`) is scored
as 1 - its value and named "1-<metric>"; a metric off that scale is one line at the teacher. torchmetrics is the ecosystem's standard for metrics that accumulate over batches (mIoU, mAP, F1).

Outputs need not be one logit vector: a dict (torchvision segmentation's {"out": ..., "aux": ...}), a tuple, a
tensor per pixel. The loss gets the raw outputs; the metric and distillation the prediction (`output`), or, with
`distill_on: outputs`, distillation matches every output tensor the teacher and the student share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from core.errors import SearchsvcError
from core.user_code import named_callable

Outputs = Any  # a tensor, a dict of tensors or a tuple of them: what the network's forward returns
SLACK = 1e-6  # a metric's rounding past 0 or 1 (float32 sums) that is still a fraction


@dataclass(frozen=True)
class TaskConfig:
    """The top-level `task:` section: the user's loss, metric and prediction (every field optional)."""

    loss: str | None = field(default=None, metadata={
        "help": "package.module:function, loss(outputs, targets) -> scalar tensor (default: cross-entropy)"})
    metric: str | None = field(default=None, metadata={
        "help": "a torchmetrics Metric class (torchmetrics.classification.MulticlassJaccardIndex) or "
                "package.module:factory returning one (default: top-1 accuracy)"})
    metric_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "omit_default": True, "help": "keyword arguments of the metric's constructor, e.g. {num_classes: 4}"})
    higher_is_better: bool = field(default=True, metadata={
        "help": "whether a larger metric is better; false (an error rate): the score is 1 - the metric"})
    output: str | int | None = field(default=None, metadata={
        "help": "which entry of a dict (key) or tuple (index) output is the prediction; default: 'out' of a dict, "
                "the first of a tuple"})
    distill_on: Literal["prediction", "outputs"] = field(default="prediction", metadata={
        "help": "prediction: a student matches the teacher's prediction (per position for dense outputs); "
                "outputs: every output tensor both share (a dict's heads, a tuple's entries)"})

    def __hash__(self) -> int:  # `metric_kwargs` is a dict: hashed by its items, so specs stay hashable
        return hash((self.loss, self.metric, tuple(sorted(self.metric_kwargs.items())), self.higher_is_better,
                     self.output, self.distill_on))

    @property
    def default(self) -> bool:
        """Classification as before: nothing of the task differs from the defaults."""
        return self == TaskConfig()

    @property
    def metric_name(self) -> str:
        """The score as the report names it: "accuracy", the metric class's or factory's name, or "1-" that name
        where lower is better."""
        name = "accuracy" if self.metric is None else self.metric.replace(":", ".").rsplit(".", 1)[-1]
        return name if self.higher_is_better else f"1-{name}"


def prediction(outputs: Outputs, output: str | int | None = None) -> torch.Tensor:
    """The tensor of `outputs` that is the prediction: a tensor itself, a dict's `output` key ('out' by default,
    else its only entry), a tuple's `output` index (default 0)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        key = output if output is not None else ("out" if "out" in outputs else next(iter(outputs)))
        if key not in outputs:
            raise SearchsvcError(f"task.output: the network's outputs have no {key!r}; they are {sorted(outputs)}")
        return outputs[key]
    if isinstance(outputs, (tuple, list)):
        index = output if isinstance(output, int) else 0
        return outputs[index]
    raise SearchsvcError(f"task.output: the network returned a {type(outputs).__name__}; expected a tensor, a dict "
                         f"or a tuple of tensors")


def output_tensors(outputs: Outputs) -> dict[str, torch.Tensor]:
    """Every tensor of `outputs` by its place ("" for a lone tensor, a dict's keys, a tuple's indices)."""
    if isinstance(outputs, torch.Tensor):
        return {"": outputs}
    if isinstance(outputs, dict):
        return {str(k): v for k, v in outputs.items() if isinstance(v, torch.Tensor)}
    return {str(i): v for i, v in enumerate(outputs) if isinstance(v, torch.Tensor)}


class Task:
    """A TaskConfig made runnable: the loss and a fresh metric per evaluation (the user's code imported once)."""

    def __init__(self, config: TaskConfig | None = None) -> None:
        self.config = config or TaskConfig()
        self._loss = named_callable(self.config.loss, "task.loss", "not package.module:function") \
            if self.config.loss else None
        self._metric = _metric_factory(self.config.metric) if self.config.metric else None

    def predict(self, outputs: Outputs) -> torch.Tensor:
        """The prediction among the network's outputs (`task.output`)."""
        return prediction(outputs, self.config.output)

    def loss(self, outputs: Outputs, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """The training loss: the user's on the raw outputs, else cross-entropy on the prediction (class targets
        held narrower — a mask of uint8 — are widened to int64 here, a batch at a time)."""
        targets = wide(targets)
        if self._loss is None:
            return F.cross_entropy(self.predict(outputs), targets, label_smoothing=label_smoothing)
        return scalar_loss(self._loss(outputs, targets), self.config.loss)

    def metric(self) -> Any:
        """A fresh metric (a torchmetrics Metric; None for the default top-1, counted without torchmetrics)."""
        if self._metric is None:
            return None
        try:
            made = self._metric(**self.config.metric_kwargs)
        except Exception as err:  # noqa: BLE001 — the user's metric and its keyword arguments
            raise SearchsvcError(f"task.metric: {self.config.metric}(**task.metric_kwargs) raised "
                                 f"{type(err).__name__}: {str(err).splitlines()[0][:200]}") from None
        from torchmetrics import Metric

        if not isinstance(made, Metric):
            raise SearchsvcError(f"task.metric: {self.config.metric} made a {type(made).__name__}, not a "
                                 f"torchmetrics Metric (one with update() and compute())")
        return made


    def score(self, metric: Any) -> float:
        """The score of an accumulated metric: its value, a fraction in [0, 1] (what every column and decision
        holds, higher better), or 1 - its value where lower is better; SearchsvcError naming task.metric if it is
        not a fraction (NaN passes: checked_metric names it)."""
        value = float(metric.compute())
        if not -SLACK <= value <= 1 + SLACK:
            raise SearchsvcError(f"task.metric: {self.config.metric} gave {value:.6g}; a score is a fraction in [0, 1] "
                                 f"(accuracy, mean IoU, F1, an error rate with higher_is_better: false) — give a "
                                 f"metric on that scale (e.g. percent / 100)")
        value = min(max(value, 0.0), 1.0)
        return value if self.config.higher_is_better else 1.0 - value

    def update(self, metric: Any, outputs: Outputs, targets: torch.Tensor) -> None:
        """`metric.update` with the prediction (float) and the targets; what it raises (shapes it cannot take) is
        one line naming task.metric."""
        predicted, targets = self.predict(outputs).float(), wide(targets)
        try:
            metric.update(predicted, targets)
        except Exception as err:  # noqa: BLE001 — the user's metric on the user's outputs
            raise SearchsvcError(f"task.metric: {self.config.metric} cannot score predictions of shape "
                                 f"{tuple(predicted.shape)} against targets of shape {tuple(targets.shape)} "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def wide(targets: torch.Tensor) -> torch.Tensor:
    """Class targets as int64 (what losses and metrics take); floats and int64 as they are."""
    return targets if targets.is_floating_point() or targets.dtype == torch.int64 else targets.long()


def as_reference(name: str) -> str:
    """"package.module:attr" of a dotted class path ("torchmetrics.classification.MulticlassJaccardIndex"), or of a
    reference already in that form."""
    module, _, attr = name.rpartition(".")
    return name if ":" in name or not module else f"{module}:{attr}"


def _metric_factory(name: str) -> Callable[..., Any]:
    """The class or factory `name` names: "package.module.Class" (a torchmetrics path) or "package.module:factory"."""
    return named_callable(as_reference(name), "task.metric", "not a dotted class path or package.module:factory")


def scalar_loss(value: Any, name: str | None) -> torch.Tensor:
    """The loss a user's function returned, if it is one number in a tensor (its shape is checked, not its value:
    reading it would wait for the device at every step; a loss that turns NaN ends training as diverged)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise SearchsvcError(f"task.loss: {name} returned {got}; expected a scalar tensor (reduce it, e.g. .mean())")
    return value.reshape(())


def checked_metric(value: float, where: str) -> float:
    """A metric's value, if finite; else SearchsvcError naming task.metric (a NaN score cannot rank anything)."""
    if not math.isfinite(value):
        raise SearchsvcError(f"task.metric: gave {value} {where}; a score must be a finite number (check "
                             f"task.metric_kwargs, e.g. num_classes, against the targets)")
    return value
