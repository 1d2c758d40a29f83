"""What one candidate evaluation gets from Ray (the `resources:` section of a job config), and the host memory one
evaluation holds (what each actor or Tune trial asks Ray for, so the scheduler never oversubscribes a node)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from workers.data.streaming import Streamed, count, take

log = logging.getLogger(__name__)
MIB = 1 << 20
# A Ray worker process with torch imported, its data loaded and its store client: 650-910 MiB RSS measured on
# 2 CPU cores (grid and agp smoke runs: ray::EvalWorker 813 MiB, a Tune trial 906 MiB), rounded up.
WORKER_MIB = 1024
MODEL_COPIES = 8  # teacher and student, the student's gradients and optimizer state, the best weights, a saved copy
ACTIVATION_COPIES = 2  # a training step keeps every layer's output for the backward pass, then its gradient


@dataclass(frozen=True)
class Resources:
    """Per-evaluation resources; several small candidates share one GPU through fractional shares."""

    gpus_per_eval: float = field(default=0.25, metadata={"min": 0, "help": "GPU share per evaluation (0.25: 4/GPU)"})
    cpus_per_eval: float = field(default=1.0, metadata={"gt": 0, "help": "CPU cores per evaluation"})
    max_concurrent: int | None = field(default=None, metadata={"min": 1, "help": "cap on evaluations in flight"})
    memory_per_eval: int | None = field(default=None, metadata={"min": 1, "help": (
        "MiB of host memory Ray reserves for each evaluation worker (pool actor or Tune trial); null: estimated "
        "from the worker's base, the data, the model's bytes and the batch (docs/clusters.md#memory)")})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each candidate's training step (GPU; pays beyond about 60-110 epochs: benchmarks/README.md)"})
    cuda_graph: bool = field(default=True, metadata={
        "help": "replay each candidate's training step as one CUDA graph where it is static (GPU, no augmentation, "
                "no per-step callbacks): small students launch-bound otherwise (benchmarks/README.md, On a GPU)"})


def with_memory(resources: Resources, model: nn.Module, splits: object, batch_size: int, on_gpu: bool) -> Resources:
    """`resources` with `memory_per_eval` filled in by `estimate_memory_mib` where the config left it null."""
    if resources.memory_per_eval is not None:
        log.info("each evaluation worker asks Ray for %d MiB of memory (resources.memory_per_eval)",
                 resources.memory_per_eval)
        return resources
    mib = estimate_memory_mib(model, splits, batch_size, on_gpu)
    log.info("each evaluation worker asks Ray for %d MiB of memory (estimated; resources.memory_per_eval sets it)",
             mib)
    return replace(resources, memory_per_eval=mib)


def workers_on_gpu(resources: Resources, device: str, driver_device: torch.device, address: str | None) -> bool:
    """Whether evaluation workers will train on a GPU (their activations then live in its memory, not the host's):
    the config lets them (`gpus_per_eval` > 0, `device` not "cpu") and the driver has a GPU, or the run goes to a
    cluster (`address`, RAY_ADDRESS), whose workers may have GPUs its head lacks."""
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    return resources.gpus_per_eval > 0 and device != "cpu" and (driver_device.type == "cuda" or on_cluster)


def estimate_memory_mib(model: nn.Module, splits: object, batch_size: int, on_gpu: bool) -> int:
    """Host memory one evaluation worker holds, in MiB: WORKER_MIB, plus the dataset as loaded (every resident
    split; a streamed one's batches in flight) and its teacher logits, plus MODEL_COPIES times the model's parameter
    and buffer bytes, plus on CPU (`on_gpu` False: a GPU keeps them in its own memory) ACTIVATION_COPIES times one
    training batch's activations."""
    held = [split for split in (splits.train, splits.val, splits.test) if not isinstance(split, Streamed)]
    data = sum(t.numel() * t.element_size() for pair in held for t in pair)
    image = take(splits.val, torch.arange(1))[0]
    data += count(splits.train) * _prediction_values(model, image) * 4  # the teacher's cached outputs, float32
    if isinstance(splits.train, Streamed):  # the batches decoded ahead, and the one in use
        per_example = splits.train.nbytes() // len(splits.train)
        data += (splits.train.workers * splits.train.prefetch + 2) * batch_size * per_example
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    step = 0 if on_gpu else ACTIVATION_COPIES * batch_size * activation_bytes(model, image)
    return WORKER_MIB + math.ceil((data + MODEL_COPIES * weights + step) / MIB)


def _prediction_values(model: nn.Module, image: torch.Tensor) -> int:
    """Values of the model's prediction for one example: its classes, or a mask of logits per pixel (a task's
    dense outputs), as distillation caches them."""
    from workers.training.task import prediction

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            x = image.to(device)
            return prediction(model(x if x.dtype == torch.int64 else x.float())).numel()
    finally:
        model.train(training)


def activation_bytes(model: nn.Module, image: torch.Tensor) -> int:
    """Bytes of every leaf module's output for one image (a forward pass in eval mode, no gradient)."""
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        total += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    training = model.training
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad():
            x = image.to(device)
            model(x if x.dtype == torch.int64 else x.float())  # token ids stay ids
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return total
