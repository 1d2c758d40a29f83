"""The training step, on one screen: resident data, GPU-side augmentation, channels_last, bf16 autocast.

No host synchronisation inside the step loop: the running loss stays a device tensor and is read once
per epoch, when the progress bar is updated.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workers.data.datasets import Splits, channel_stats_on, normalize
from workers.data.streaming import Split, count, device_of, epoch_order, index_batches, take
from workers.data.streaming import batches as split_batches
from workers.models.inputs import InputSpec, in_layout
from workers.training.callbacks import Checkpointer, TrainCallback
from workers.training.cuda_graph import GraphedStep
from workers.training.task import Task, TaskConfig, prediction

log = logging.getLogger(__name__)
MIN_ONE_CYCLE_STEPS = 8  # below this, the one-cycle schedule has empty phases
# Upper bounds of the recipe's numbers: beyond them SGD overflows to inf/NaN within a few steps (lr 1e308 does at
# once); far above any value that trains (peak lr 0.05-0.4, weight decay 1e-5-1e-3, temperature 1-20).
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 1.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


@dataclass(frozen=True)
class Recipe:
    """How a network is trained (SGD with Nesterov momentum, or AdamW; one-cycle learning rate)."""

    epochs: int = field(default=1, metadata={"min": 1, "help": "passes over the training split"})
    batch_size: int = field(default=256, metadata={"min": 1, "help": "images per step"})
    lr: float = field(default=0.05, metadata={"gt": 0, "max": MAX_LR,
                                              "help": "peak learning rate of the one-cycle schedule"})
    momentum: float = field(default=0.9, metadata={"min": 0, "lt": 1, "help": "SGD (Nesterov) momentum"})
    optimizer: Literal["sgd", "adamw"] = field(default="sgd", metadata={
        "omit_default": True, "help": "sgd (Nesterov momentum) or adamw (decoupled weight decay; what transformers "
                                      "such as a Hugging Face BERT train with: SGD leaves them at the class prior)"})
    weight_decay: float = field(default=5e-4, metadata={"min": 0, "max": MAX_WEIGHT_DECAY, "help": "L2 weight decay"})
    label_smoothing: float = field(default=0.0, metadata={"min": 0, "lt": 1, "help": "cross-entropy smoothing"})
    augment: bool = field(default=True, metadata={"help": "random crop (pad 1/8 of the height) and horizontal flip of "
                                                            "images (other inputs are not augmented)"})
    max_images: int | None = field(default=None, metadata={
        "min": 1, "help": "images per epoch, a fresh random subset each epoch; null: the whole training split"})
    task: TaskConfig | None = field(default=None, metadata={
        "omit_default": True, "help": "copied from the top-level task: section (write it there): the loss trained "
                                      "on and the metric judged by; null: classification"})


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: loss = (1-alpha)·CE + alpha·T²·KL(teacher_T || student_T)."""

    alpha: float = field(default=0.9, metadata={"min": 0, "max": 1, "help": "weight of the distillation term"})
    temperature: float = field(default=4.0, metadata={
        "min": MIN_TEMPERATURE, "max": MAX_TEMPERATURE, "help": "softmax temperature T"})
    loss: Literal["kl", "logits"] = field(default="kl", metadata={"help": "kl (Hinton) or logits (L2 regression)"})


# Batches whose statistics replace the batch-norm running averages after a candidate's training:
# chosen by measurement (benchmarks/README.md, "Batch-norm recalibration"); 0 turns recalibration off.
DEFAULT_BN_RECALIBRATION_BATCHES = 8


@dataclass(frozen=True)
class TrainConfig(Recipe):
    """How each candidate is trained: a recipe plus distillation from the teacher."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    bn_recalibration_batches: int = field(default=DEFAULT_BN_RECALIBRATION_BATCHES, metadata={
        "min": 0, "help": "training batches whose statistics replace the batch-norm running averages before a "
                          "candidate is measured (after few steps they lag the weights); 0: off"})


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` → the GPU Ray (or CUDA_VISIBLE_DEVICES) gave this process if any, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def largest_side(inputs: InputSpec) -> int:
    """An image's larger side, px (0 for inputs that are not images)."""
    return max(inputs.shape[1:]) if inputs.is_image else 0


def augments(recipe: Recipe, inputs: InputSpec) -> bool:
    """Whether training on `inputs` is augmented: the recipe says so and they are images (what `augment` crops)."""
    return recipe.augment and inputs.is_image


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by 1/8 of the height, and random horizontal flip, batched on device; inputs
    that are not image batches [N, C, H, W] are returned as they are (nothing to crop or flip)."""
    if images.dim() != 4:
        return images
    n, c, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(h, device=images.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=images.device).view(1, 1, w)).expand(n, h, w)
    flip = torch.rand(n, 1, 1, device=images.device, generator=generator) < 0.5
    cols = torch.where(flip, dx + (w - 1) - torch.arange(w, device=images.device).view(1, 1, w), cols)
    flat = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, flat).view(n, c, h, w)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
             std: tuple[float, ...], batch_size: int = 1024) -> float:
    """Top-1 accuracy (0..1) of `model` on uint8 `images` already on the model's device."""
    return evaluate_split(model, (images, labels), mean, std, batch_size)


@torch.inference_mode()
def evaluate_split(model: nn.Module, split: Split, mean: tuple[float, ...], std: tuple[float, ...],
                   batch_size: int = 1024, task: Task | None = None) -> float:
    """The task's metric of `model` on a split (resident on the model's device, or streamed to it): top-1 accuracy
    (0..1) by default, else the task's torchmetrics metric accumulated over the batches."""
    if count(split) == 0:
        return float("nan")
    model.eval()
    device = device_of(split)
    metric = task.metric() if task is not None else None
    if metric is not None:
        metric = metric.to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _, images, labels in split_batches(split, batch_size):
            x = in_layout(normalize(images, mean, std), torch.channels_last)
            outputs = model(x)
            if metric is not None:
                task.update(metric, outputs, labels)
            else:
                correct += (prediction(outputs).argmax(1) == labels).sum()
    return task.score(metric) if metric is not None else correct.item() / count(split)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, splits: Splits, batches: int, batch_size: int, seed: int = 0,
                          layout: torch.memory_format | None = None) -> int:
    """Re-estimate every batch-norm layer's running mean and variance on `batches` random training batches
    (no augmentation, no gradient, the training memory format); return the batches used (0: no BN layer,
    or `batches` is 0). The weights do not change. `splits` must be on the model's device.

    Why: the running averages trail the weights by their momentum (0.1 per step): after a short fine-tune
    or a pruning step they describe an older network, and eval-mode accuracy falls far below what the
    weights can do (a 7-step fine-tune of a pruned tiny_cnn: 59 % test with the lagging statistics, 95 % after).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not norms:
        return 0
    train, device = splits.train, device_of(splits.train)
    size = min(batch_size, count(train))
    layout = layout or training_memory_format(model, device, size, largest_side(splits.inputs))
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    was_training = model.training
    model.train()
    generator = torch.Generator(device=device).manual_seed(seed)
    used = min(batches, max(1, count(train) // size))
    order = epoch_order(train, generator, device)[:used * size]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _, batch, _ in split_batches(train, size, order):
            model(in_layout(normalize(batch, splits.mean, splits.std), layout))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return used


def slow_norms(model: nn.Module) -> bool:
    """Whether a batch-norm layer averages its statistics slower than torch's default momentum of 0.1 (or
    cumulatively): torchvision's MobileNetV3 and EfficientNets use 0.01, so after a short training their running
    averages still describe the untrained network (a LR-ASPP teacher: 0.18 mean IoU in eval mode, 0.88 with its
    batches' statistics)."""
    return any(m.momentum is None or m.momentum < 0.1 for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats)


ONEDNN_LARGE_SIDE = 56  # px: from here a strided 1x1 conv of 8 input channels crashes too (48 px did not)


def training_memory_format(model: nn.Module, device: torch.device, batch: int, side: int = 0
                           ) -> torch.memory_format:
    """channels_last, except on the CPU for a network with a strided 1x1 conv (a projection shortcut) when
    the batch is odd, that conv's input channels are not a multiple of 8, or fewer than 16 on images of
    ONEDNN_LARGE_SIDE px or more (`side`: the input's largest side; tiny_cnn at 64 px): there torch 2.14.1's
    oneDNN corrupts the heap in the conv's backward pass on channels_last tensors (pruned networks have such
    widths; SIGSEGV or abort). NCHW is slower there (tiny_cnn at 32 px: 90 against 55 ms a step) but correct.
    `tests/test_distill_measure.py::test_the_onednn_workaround_is_still_needed` fails once a torch release no
    longer crashes: then this can go."""
    if device.type == "cpu" and any(
            m.kernel_size == (1, 1) and m.stride != (1, 1) and (
                batch % 2 or m.in_channels % 8 or (m.in_channels < 16 and side >= ONEDNN_LARGE_SIDE))
            for m in model.modules() if isinstance(m, nn.Conv2d)):
        return torch.contiguous_format
    return torch.channels_last


# (student logits, labels, indices of the batch in the training split, the normalised batch) → loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _snapshot(epochs_done: int, loop: "_Loop", callbacks: Sequence[TrainCallback],
              history: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything that continues training exactly after `epochs_done` epochs (tensors on the CPU)."""
    return {"epoch": epochs_done, "history": [dict(r) for r in history],
            "model": {k: v.detach().cpu() for k, v in loop.model.state_dict().items()},
            "optimizer": loop.optimizer.state_dict(), "schedule": loop.schedule.state_dict(),
            "generator": loop.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks]}


def _restore(state: dict[str, Any], loop: "_Loop", callbacks: Sequence[TrainCallback]) -> tuple[int, list]:
    """Put a snapshot back (after on_train_begin); return (epochs done, history so far)."""
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.schedule.load_state_dict(state["schedule"])
    loop.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for cb, cb_state in zip(callbacks, state["callbacks"]):
        if cb_state is not None:
            cb.load_state_dict(cb_state)
    return int(state["epoch"]), list(state["history"])


def train_model(model: nn.Module, splits: Splits, recipe: Recipe, device: torch.device, seed: int = 0,
                desc: str = "train", progress: bool = True, loss_fn: LossFn | None = None,
                compile_model: bool = False, callbacks: Sequence[TrainCallback] = (),
                cuda_graph: bool = True) -> list[dict[str, Any]]:
    """Train `model` in place on `splits` (moved to `device`); return one dict per epoch.

    Each epoch's dict holds loss (mean over steps), images_per_s, val_accuracy and test_accuracy, measured
    after the batch-norm statistics are re-estimated when the recipe asks for it (candidates' TrainConfig;
    a teacher's recipe does not). `loss_fn` replaces plain cross-entropy (distillation looks up or computes
    the batch's teacher logits). `compile_model` runs the steps through `torch.compile` (pays off on a GPU
    for many epochs: benchmarks/README.md). `callbacks` see every epoch and step (a compression schedule prunes through them).
    `cuda_graph` replays each step as one CUDA graph where the step is static (workers.training.cuda_graph: a GPU, no
    augmentation, not compiled, graph-safe callbacks); each epoch's dict says whether it did (cuda_graph).
    """
    torch.manual_seed(seed)
    data = splits.to(device)
    per_epoch = min(count(data.train), recipe.max_images or count(data.train))
    batch = min(recipe.batch_size, per_epoch)
    steps = per_epoch // batch  # drop the ragged last batch: static shapes, no tiny noisy steps
    layout = training_memory_format(model, device, batch, largest_side(data.inputs))
    model.to(device=device, memory_format=layout)
    optimizer, schedule = _optimizer(model, recipe, recipe.epochs * steps, callbacks)
    loop = _Loop(model, torch.compile(model) if compile_model else model, data, recipe, layout, optimizer, schedule,
                 torch.Generator(device=device).manual_seed(seed), loss_fn, callbacks, Task(recipe.task))
    if cuda_graph and not data.streamed and _graphable(device, recipe, compile_model, callbacks):
        loop.graphed = GraphedStep(model, loop.batch_loss, batch, device)
    bar = _progress_bar(recipe.epochs * steps, desc, progress)
    for cb in callbacks:
        cb.on_train_begin(model, optimizer, recipe.epochs * steps)
    history: list[dict[str, Any]] = []
    start = 0
    keeper = next((cb for cb in callbacks if isinstance(cb, Checkpointer)), None)
    state = keeper.load() if keeper is not None else None
    if state is not None:  # a restarted trial: on from the last finished epoch, none trained twice
        start, history = _restore(state, loop, callbacks)
        bar.update(start * steps)
        log.info("%s: resumed after epoch %d of %d", desc, start, recipe.epochs)
    for epoch in range(start, recipe.epochs):
        started = time.perf_counter()
        mean_loss = loop.epoch(epoch, per_epoch, batch, bar)
        record = _epoch_record(model, data, recipe, epoch, mean_loss, steps * batch, time.perf_counter() - started,
                               seed, batch, layout, loop.task)
        record["cuda_graph"] = loop.graphed is not None and loop.graphed.replays > 0
        record["data_wait_s"] = loop.data_wait_s  # seconds the steps waited for their batches (streamed data)
        for cb in callbacks:
            cb.on_epoch_end(epoch, record)
        history.append(record)
        if keeper is not None and epoch + 1 < recipe.epochs and math.isfinite(mean_loss):
            keeper.save(_snapshot(epoch + 1, loop, callbacks, history), record)
        bar.set_description(f"{desc} epoch {epoch + 1}/{recipe.epochs}")
        bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{record['images_per_s']:.0f}",
                        test_acc=f"{record['test_accuracy']:.4f}")
        if not math.isfinite(mean_loss):
            break  # a diverged run: the caller decides what an invalid result means
    bar.close()
    loop.graphed = None  # the graph and the loop refer to each other: free its memory pool now, not at a gc
    return history


def _graphable(device: torch.device, recipe: Recipe, compile_model: bool,
               callbacks: Sequence[TrainCallback]) -> bool:
    """A static step: the same kernels on the same buffers every time (the conditions in workers.training.cuda_graph)."""
    return (device.type == "cuda" and not recipe.augment and not compile_model
            and all(cb.graph_safe for cb in callbacks))


def _optimizer(model: nn.Module, recipe: Recipe, total: int,
               callbacks: Sequence[TrainCallback]) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with Nesterov momentum (or AdamW) and the one-cycle learning rate over `total` steps."""
    if recipe.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                    nesterov=recipe.momentum > 0, weight_decay=recipe.weight_decay)
    if total >= MIN_ONE_CYCLE_STEPS and not any(cb.controls_lr for cb in callbacks):
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total,
                                                       pct_start=0.25, anneal_strategy="linear")
    else:  # OneCycleLR divides by zero when a phase has no steps: a constant rate for tiny runs (or a
        # callback's own lr schedule on top)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, schedule


def _progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    # In a log file (Ray job, CI) redraws become lines: redraw at most every 15 s there.
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True,
                mininterval=0.2 if interactive else 15.0)


@dataclass
class _Loop:
    """The step loop of `train_model`: one epoch of steps, no host sync until its mean loss is read."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # the model, or its compiled form
    data: Splits
    recipe: Recipe
    layout: torch.memory_format
    optimizer: torch.optim.Optimizer
    schedule: Any
    generator: torch.Generator
    loss_fn: LossFn | None
    callbacks: Sequence[TrainCallback]
    task: Task  # the loss (without loss_fn) and the metric of the epoch records
    graphed: GraphedStep | None = None  # the step as a CUDA graph, once warmed up
    data_wait_s: float = 0.0  # the last epoch's seconds spent waiting for batches

    def criterion(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                  images: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(logits, labels, index, images)
        return self.task.loss(logits, labels, self.recipe.label_smoothing)

    def epoch(self, epoch: int, per_epoch: int, batch: int, bar: tqdm) -> float:
        """Train one epoch (counted from 0) on a fresh random `per_epoch` images; return the mean loss."""
        train = self.data.train
        device = device_of(train)
        channel_stats_on(tuple(self.data.mean), tuple(self.data.std), device)  # on the device before the loop
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        steps = per_epoch // batch
        order = epoch_order(train, self.generator, device)[:steps * batch]  # a sharded split: row group by row group
        self.data_wait_s = 0.0
        reading = iter(index_batches(train, batch, order))
        for step in range(steps):
            asked = time.perf_counter()
            index, images, labels = next(reading)
            self.data_wait_s += time.perf_counter() - asked  # streamed: the batch was not decoded yet
            loss_sum += self.step(epoch, step, steps, index, images, labels)
            bar.update(1)
        return loss_sum.item() / steps  # the one host sync of the epoch

    def step(self, epoch: int, step: int, steps: int, index: torch.Tensor, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """One optimizer step on the training examples at `index` (`images` and `labels`: a streamed split's
        batch; a resident split's are indexed from it); returns its loss (a device tensor, detached)."""
        for cb in self.callbacks:
            cb.on_minibatch_begin(epoch, step, steps)
        graphed = self.graphed
        loss = graphed.run(index) if graphed is not None and graphed.ready() else None
        if loss is None:
            loss = self.eager_backward(epoch, step, steps, index, images, labels)
            if graphed is not None and graphed.active:
                graphed.count_eager()
        if all([cb.before_optimizer_step(epoch, step, steps) for cb in self.callbacks]):  # every one is asked
            self.optimizer.step()
        self.schedule.step()
        for cb in self.callbacks:
            cb.on_minibatch_end(epoch, step, steps)
        return loss

    def eager_backward(self, epoch: int, step: int, steps: int, index: torch.Tensor,
                       images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Forward, loss (through the callbacks) and backward of the batch at `index`; the detached loss."""
        if images is None or labels is None:
            images, labels = take(self.data.train, index)
        if self.recipe.augment and labels.ndim == 1:  # dense targets (masks) would need the same crop and flip
            images = augment(images, self.generator)
        images = in_layout(normalize(images, self.data.mean, self.data.std), self.layout)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            loss = self.criterion(self.forward(images), labels, index, images)
        for cb in self.callbacks:
            loss = cb.before_backward_pass(epoch, step, steps, loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach()

    def batch_loss(self, index: torch.Tensor) -> torch.Tensor:
        """The loss of the (unaugmented) batch at `index`, read through `index` alone: what a CUDA graph
        captures. Autocast's weight cache is off: a graph must cast the weights it replays with."""
        x_train, y_train = self.data.train
        images = in_layout(normalize(x_train[index], self.data.mean, self.data.std), self.layout)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return self.criterion(self.forward(images), y_train[index], index, images)


def _epoch_record(model: nn.Module, data: Splits, recipe: Recipe, epoch: int, mean_loss: float, images: int,
                  seconds: float, seed: int, batch: int, layout: torch.memory_format, task: Task) -> dict[str, Any]:
    """After an epoch: batch-norm statistics re-estimated (if the recipe says so), both splits evaluated."""
    recalibrated = recalibrate_batchnorm(model, data, getattr(recipe, "bn_recalibration_batches", 0), batch,
                                         seed + epoch + 1, layout)
    return {"epoch": epoch + 1, "loss": mean_loss, "images_per_s": images / seconds,
            "val_accuracy": evaluate_split(model, data.val, data.mean, data.std, task=task),
            "test_accuracy": evaluate_split(model, data.test, data.mean, data.std, task=task),
            "seconds": seconds, "bn_recalibration_batches": recalibrated}
