"""A model as ONNX, run with ONNX Runtime on the CPU: where many users deploy what a search hands over.

`onnx_bytes` exports (the TorchScript-based exporter: it takes the zoo's and torchvision's networks as they
are, with a dynamic batch axis); `session` opens it with a fixed number of intra-op threads; `latency_ms`
times it. Imported only where ONNX Runtime is used: `onnxruntime` is an optional dependency (`available`).
"""

from __future__ import annotations

import copy
import importlib.util
import io
import statistics
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from workers.measurement.measure import unfused_attention
from workers.models.inputs import InputSpec

INPUT, OUTPUT = "images", "logits"  # the exported graph's input and output names
NOT_INSTALLED = "onnxruntime is not installed (pip install onnxruntime, or searchsvc's 'export' extra)"


def available() -> bool:
    """Whether ONNX Runtime is installed (else NOT_INSTALLED says how to install it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_bytes(model: nn.Module, inputs: InputSpec) -> bytes:
    """The model as an ONNX file's bytes: fp32, on the CPU, eval mode, batch axis dynamic. The model itself is
    left where it was (a copy is exported)."""
    cpu = copy.deepcopy(model).float().cpu().eval()
    example = torch.zeros(1, *inputs.shape, dtype=inputs.dtype)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), unfused_attention():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is legacy
        torch.onnx.export(cpu, (example,), buffer, dynamo=False, input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    return buffer.getvalue()


def session(model: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session of `model` (ONNX bytes) on `threads` intra-op threads, run sequentially:
    what a deployment with that many cores gets."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no optimizer chatter per candidate
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def random_batch(inputs: InputSpec, batch: int) -> np.ndarray:
    """`batch` random examples as ONNX Runtime takes them: standard normal float32, or int64 token ids."""
    rng = np.random.default_rng(0)
    if inputs.tokens is not None:
        return rng.integers(0, inputs.tokens, (batch, *inputs.shape), dtype=np.int64)
    return rng.standard_normal((batch, *inputs.shape), dtype=np.float32)


def latency_ms(model: bytes, inputs: InputSpec, batch: int, threads: int, repeats: int, warmup: int = 2
               ) -> float:
    """Median wall time of one ONNX Runtime forward pass of `model` (ONNX bytes) at `batch` on `threads`
    CPU threads, milliseconds."""
    runner = session(model, threads)
    x = random_batch(inputs, batch)
    times = []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        runner.run([OUTPUT], {INPUT: x})
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)

