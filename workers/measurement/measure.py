"""What a candidate costs: parameters, MACs (counted), latency (measured), bytes on disk, and accuracy."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from workers.data.datasets import Splits
from workers.models.inputs import InputSpec
from workers.models.zoo import state_dict_bytes
from workers.training.task import Task
from workers.training.train import evaluate_split


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


# MACs by (model class, architecture, input shape): the FLOP counter's traced forward costs more than a
# small candidate's measurement, and a search builds the same architecture many times (seeds, methods).
_MACS: dict[tuple[Any, ...], int] = {}


def count_macs(model: nn.Module, inputs: InputSpec) -> int:
    """Multiply-accumulates for one example (FLOPs / 2 of torch's FLOP counter); remembered per architecture
    for models that describe theirs (`model.arch`, frozen data), counted afresh for any other model."""
    arch = getattr(model, "arch", None)
    key = (type(model), arch, inputs.shape) if arch is not None else None
    if key is not None and key in _MACS:
        return _MACS[key]
    macs = _count_macs(model, inputs)
    if key is not None:
        _MACS[key] = macs
    return macs


@contextmanager
def unfused_attention() -> Iterator[None]:
    """nn.MultiheadAttention without its fused inference kernel while open: torch's FLOP counter has no formula
    for that kernel (ViT-B/32 counted 2.9 G MACs instead of 4.4 G) and ONNX has no operator for it."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _count_macs(model: nn.Module, inputs: InputSpec) -> int:
    x = inputs.example(model)
    was_training = model.training
    model.eval()
    with torch.no_grad(), unfused_attention(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def model_bytes(model: nn.Module) -> int:
    """Size of the saved state_dict (what `candidates/<hash>/model.pt` takes)."""
    return len(state_dict_bytes(model))


@torch.inference_mode()
def latency_ms(model: nn.Module, device: torch.device, inputs: InputSpec, batch: int, repeats: int,
               warmup: int = 2) -> float:
    """Median wall time of one forward pass at `batch` on `device`, milliseconds."""
    model.eval()
    x = inputs.batch(batch, device, random=True)
    times = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for step in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def measure(model: nn.Module, splits: Splits, device: torch.device, latency_repeats: int = 10,
            large_batch: int = 256, timed: bool = True, accuracies: dict[str, float] | None = None,
            task: Task | None = None) -> dict[str, Any]:
    """Accuracy on the test split, params, MACs, latency at batch 1 and `large_batch`, model bytes.

    `splits` must already be on `device`. Large-batch latency uses a third of the repeats: it is the
    slow one on a CPU and its median is stable sooner. `timed=False` skips the latencies and bytes
    (a sensitivity point only needs accuracy). `accuracies` (accuracy, val_accuracy) are this model's,
    already measured (by the last training epoch): the splits are not evaluated again. With a `task`, the
    accuracies are its metric's values.
    """
    inputs = splits.inputs
    accuracies = accuracies or {"accuracy": evaluate_split(model, splits.test, splits.mean, splits.std, task=task),
                                "val_accuracy": evaluate_split(model, splits.val, splits.mean, splits.std, task=task)}
    counted = {
        **accuracies,
        "params": count_parameters(model),
        "macs": count_macs(model, inputs),
    }
    if not timed:
        return counted
    return {
        **counted,
        "latency_ms": latency_ms(model, device, inputs, 1, latency_repeats),
        "latency_b256_ms": latency_ms(model, device, inputs, large_batch, max(1, latency_repeats // 3)),
        "model_bytes": model_bytes(model),
    }
