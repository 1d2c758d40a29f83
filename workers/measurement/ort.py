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
from workers.models.inputs import InputSpec, PartsModel

INPUT, OUTPUT = "images", "logits"  # the exported graph's input and output names
NOT_INSTALLED = "onnxruntime is not installed (pip install onnxruntime, or searchsvc's 'export' extra)"


def available() -> bool:
    """Whether ONNX Runtime is installed (else NOT_INSTALLED says how to install it)."""
    return importlib.util.find_spec("onnxruntime") is not None


def onnx_bytes(model: nn.Module, inputs: InputSpec) -> bytes:
    """The model as an ONNX file's bytes: fp32, on the CPU, eval mode, batch axis dynamic; one input named INPUT,
    or one per part of inputs of several (`input_ids`, `attention_mask`, ... as the model takes them). The model
    itself is left where it was (a copy is exported)."""
    cpu = copy.deepcopy(model).float().cpu().eval()
    example = inputs.batch(1)
    if inputs.parts is not None:
        cpu, example = PartsModel(cpu, inputs.parts), tuple(example[:, i] for i in range(len(inputs.parts)))
    else:
        example = (example.contiguous(),)
    names = input_names(inputs)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), unfused_attention():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is legacy
        torch.onnx.export(cpu, example, buffer, dynamo=False, input_names=names, output_names=[OUTPUT],
                          dynamic_axes={**{name: {0: "batch"} for name in names}, OUTPUT: {0: "batch"}})
    return buffer.getvalue()


def input_names(inputs: InputSpec) -> list[str]:
    """The exported graph's inputs: INPUT, or the parts' names."""
    return list(inputs.parts) if inputs.parts is not None else [INPUT]


def feeds(inputs: InputSpec | None, batch: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """A batch as ONNX Runtime takes it, by input name: float32 (int64 token ids as they are); inputs of several
    parts split into one array per part (None: a single input)."""
    array = batch.cpu().numpy() if isinstance(batch, torch.Tensor) else batch
    array = array if array.dtype == np.int64 else array.astype(np.float32, copy=False)
    if inputs is None or inputs.parts is None:
        return {INPUT: array}
    return {name: np.ascontiguousarray(array[:, i]) for i, name in enumerate(inputs.parts)}


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


def random_batch(inputs: InputSpec, batch: int) -> dict[str, np.ndarray]:
    """`batch` random examples as ONNX Runtime takes them (`feeds`): standard normal float32, or int64 token ids
    (of several parts: the other parts ones, as InputSpec.batch makes them)."""
    rng = np.random.default_rng(0)
    if inputs.tokens is not None:
        ids = rng.integers(0, inputs.tokens, (batch, *inputs.shape), dtype=np.int64)
        if inputs.parts is not None:
            ids[:, 1:] = 1
        return feeds(inputs, ids)
    return feeds(inputs, rng.standard_normal((batch, *inputs.shape), dtype=np.float32))


def latency_ms(model: bytes, inputs: InputSpec, batch: int, threads: int, repeats: int, warmup: int = 2
               ) -> float:
    """Median wall time of one ONNX Runtime forward pass of `model` (ONNX bytes) at `batch` on `threads`
    CPU threads, milliseconds."""
    runner = session(model, threads)
    feed = random_batch(inputs, batch)
    times = []
    for step in range(warmup + repeats):
        started = time.perf_counter()
        runner.run([OUTPUT], feed)
        if step >= warmup:
            times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)

