"""Latency per layer: each convolution and linear layer of a model timed alone on a budget's backend, so a pruning
step prices a cut in milliseconds without timing whole models.

Why a table: a budgeted step weighs dozens of cuts (workers.compression.taylor lands by bisection; a ranking per
unit of cost prices every group), and what a chunk of channels saves is below a whole model's run-to-run noise on
a CPU. A layer alone is timed once per configuration (its repr — type, widths, kernel, stride, groups — and its
input shape) and reused by every cut that leaves it so.

What it sees that MACs do not (measured on this project's 2-core AVX-512 VM, benchmarks/README.md "int8 after
pruning"): ONNX Runtime's fp32 convolutions compute channels in blocks of 16, so an 8-wide layer costs nearly a
16-wide one's time; its int8 convolution at 28 x 28 px and batch 256 costs about 6 ms at 8 channels and at 16 (a
per-pixel cost dominates), where a 64-wide one at 7 x 7 px costs 1.4 ms.

A cut model's latency is predicted as the parent's measured latency times the ratio of their table sums: the
layers the table leaves out (activations, additions, pooling, attention's products) are taken to scale with the
layers around them. The stored figure of a candidate is always measured, never predicted.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from torch import nn

from workers.compression.quantize import QuantizeConfig, quantize_onnx
from workers.measurement import ort
from workers.measurement.latency import LatencyCost, time_probe
from workers.models.inputs import InputSpec

TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)


def layer_inputs(model: nn.Module, inputs: InputSpec) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """Each timed layer the model calls as a module, with the shape of one example's input to it (no batch)."""
    seen: list[tuple[nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, args, _out: seen.append((m, tuple(args[0].shape[1:]))))
             for m in model.modules() if isinstance(m, TIMED)]
    try:
        with torch.no_grad():
            model.eval()(inputs.example(model))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


class LayerTable:
    """Milliseconds of layers alone on one latency cost's backend, timed once per configuration."""

    def __init__(self, cost: LatencyCost, device: torch.device) -> None:
        self.cost, self.device = cost, device
        self.times: dict[tuple[str, tuple[int, ...]], float] = {}

    def layer_ms(self, layer: nn.Module, shape: tuple[int, ...]) -> float:
        """One layer's time (`least_ms`) at the probe's batch on an input of `shape` (one example's), ms."""
        key = (repr(layer), shape)
        if key not in self.times:
            self.times[key] = least_ms(copy.deepcopy(layer).float().eval(), InputSpec(shape), self.cost, self.device)
        return self.times[key]

    def model_ms(self, model: nn.Module, inputs: InputSpec) -> float:
        """The sum of the table over the model's timed layers, milliseconds."""
        return sum(self.layer_ms(layer, shape) for layer, shape in layer_inputs(model, inputs))


class LatencyCounter:
    """A model's predicted latency on a cost's backend: the parent's measured latency (as candidates' are measured)
    scaled by the table (`parent_ms` × table(model) / table(parent)), milliseconds. The table, of least times, is
    shared by every cut it prices."""

    def __init__(self, parent: nn.Module, cost: LatencyCost, inputs: InputSpec, device: torch.device) -> None:
        self.table, self.inputs = LayerTable(cost, device), inputs
        self.parent_ms = measured_ms(parent, cost, inputs, device)
        self.parent_table = self.table.model_ms(parent, inputs)

    def __call__(self, model: nn.Module) -> float:
        return self.parent_ms * self.table.model_ms(model, self.inputs) / max(self.parent_table, 1e-9)


def measured_ms(model: nn.Module, cost: LatencyCost, inputs: InputSpec, device: torch.device) -> float:
    """The whole model's latency on the cost's probe as a candidate's stored figure is measured (the median of a
    probe's passes; of its int8 model for an int8 cost), milliseconds: the parent a step's predictions scale
    from, in the units the budget is judged in. A model the backend cannot run raises."""
    if cost.int8:
        return ort.latency_ms(_onnx(model, inputs, True), inputs, cost.probe.batch, cost.probe.threads or 1,
                              cost.probe.repeats)
    measured = time_probe(model, cost.probe, device, inputs)
    if measured is None:
        raise RuntimeError(f"{cost.probe.describe()}: the model could not be timed (see the warning above)")
    return measured


def least_ms(module: nn.Module, inputs: InputSpec, cost: LatencyCost, device: torch.device) -> float:
    """The least wall time of `repeats` forward passes of `module` on the cost's backend, batch and threads,
    milliseconds. The least, not the median: on a shared machine interference only adds time, and a table whose
    entries are timed minutes apart must not carry each moment's load into the comparison of two cuts."""
    probe = cost.probe
    repeats = probe.repeats + 2
    if probe.backend == "torch":
        module = module.to(device).eval()
        x = inputs.batch(probe.batch, device, random=True)

        def run() -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                module(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    else:
        session = ort.session(_onnx(module, inputs, cost.int8), probe.threads or 1)
        feed = ort.random_batch(inputs, probe.batch)
        run = lambda: session.run([ort.OUTPUT], feed)  # noqa: E731
    run()  # warm-up: first-call allocations and kernel choices
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000.0)
    return min(times)


def _onnx(model: nn.Module, inputs: InputSpec, int8: bool) -> bytes:
    """The model as ONNX for ONNX Runtime; `int8`: quantized as `quantize:` does, its ranges calibrated on random
    inputs (what is wanted is its time, not its accuracy)."""
    exported = ort.onnx_bytes(model, inputs)
    if not int8:
        return exported
    calibration = np.random.default_rng(0).standard_normal((8, *inputs.shape), dtype=np.float32)
    return quantize_onnx(exported, calibration, QuantizeConfig(calibration_batches=1, calibration_batch_size=8))
