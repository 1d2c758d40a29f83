"""Post-training int8 quantization of a kept model with ONNX Runtime's static quantizer, and its measurement.

    candidates/<spec_hash>/int8-<config key>/model.onnx     the int8 model (QDQ: weights int8 per channel,
                                                           activations uint8, scales from calibration)
    candidates/<spec_hash>/int8-<config key>/int8.json     the QuantizeConfig and the Int8Metrics
    candidates/<spec_hash>/int8-<config key>/manifest.json sha256 of both; written last (present = complete)

Why ONNX Runtime and not PyTorch's export-based quantization (PT2E): docs/quantization.md. The model is
exported to ONNX in fp32 (workers.measurement.ort), pre-processed (shape inference, batch norm folded), calibrated on
`calibration_batches` training batches (normalised as training normalises them) and quantized; its accuracy
is then measured by ONNX Runtime itself on the validation and test splits, its latency on `threads` CPU
threads at batch 1 and 256 beside the fp32 model's on the same threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn

from core import records
from core.records import MAX_SEED, RecordError
from storage import ArtifactStore, CorruptArtifactError, StoreError, WriteConflictError, layout
from storage.base import json_bytes
from workers.data.datasets import Splits, normalize
from workers.data.streaming import Split, batches, count, epoch_order, take
from workers.measurement import ort
from workers.models.inputs import InputSpec
from workers.training.task import Task

log = logging.getLogger(__name__)
OTHER_WRITER_S = 30.0  # seconds to wait for another writer's int8 manifest: it is two writes ahead at most
UNIT = {"min": 0, "max": 1}
COUNT = {"min": 0}


@dataclass(frozen=True)
class QuantizeConfig:
    """The top-level `quantize:` section: every kept candidate also quantized to int8 and measured."""

    bits: int = field(default=8, metadata={"help": "bit width of weights and activations: 8 (lower: not yet)"})
    calibration_batches: int = field(default=8, metadata={
        "min": 1, "help": "training batches the activation ranges are calibrated on"})
    calibration_batch_size: int = field(default=64, metadata={"min": 1, "help": "images per calibration batch"})
    backend: Literal["onnxruntime"] = field(default="onnxruntime", metadata={
        "help": "onnxruntime: ONNX Runtime's static quantizer, run on the CPU (docs/quantization.md)"})
    method: Literal["minmax", "entropy", "percentile"] = field(default="minmax", metadata={
        "help": "how activation ranges are taken from the calibration batches"})
    per_channel: bool = field(default=True, metadata={"help": "one weight scale per output channel"})
    threads: int = field(default=1, metadata={"min": 1, "help": "CPU threads the int8 and fp32 latencies use"})
    seed: int = field(default=0, metadata={"min": 0, "max": MAX_SEED, "help": "which training images calibrate"})

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise ValueError(f"bits: only 8 is supported (lower bit widths are not yet), got {self.bits}")

    def key(self) -> str:
        """16 hex digits naming this setting: the int8 folder of a candidate (a new setting, a new folder)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Int8Metrics:
    """What an int8 model measured: accuracy by ONNX Runtime, CPU latency beside the fp32 model's, bytes."""

    int8_accuracy: float = field(metadata=UNIT)  # top-1 on the test split: reported only
    int8_val_accuracy: float = field(metadata=UNIT)  # top-1 on the validation split
    int8_latency_ms: float = field(metadata=COUNT)  # batch 1, median, on `int8_threads` CPU threads
    int8_latency_b256_ms: float = field(metadata=COUNT)  # batch 256, median
    int8_model_bytes: int = field(metadata=COUNT)  # the int8 ONNX file
    fp32_ort_latency_ms: float = field(metadata=COUNT)  # the fp32 ONNX model, batch 1, same threads
    fp32_ort_latency_b256_ms: float = field(metadata=COUNT)
    fp32_onnx_bytes: int = field(metadata=COUNT)  # the fp32 ONNX file it was quantized from
    int8_threads: int = field(metadata={"min": 1})
    int8_calibration_images: int = field(metadata={"min": 1})
    int8_source: Literal["ptq", "qat"] = "ptq"  # post-training, or the end of quantization-aware training


INT8_COLUMNS = tuple(f for f in Int8Metrics.__dataclass_fields__)


@dataclass
class Quantized:
    """An int8 model (ONNX bytes) and what it measured."""

    onnx: bytes
    metrics: Int8Metrics


def calibration_images(splits: Splits, config: QuantizeConfig) -> np.ndarray:
    """`calibration_batches` × `calibration_batch_size` training images (a seeded random choice), normalised as
    training normalises them, float32 on the CPU (token ids: int64): what the activation ranges are taken from."""
    order = epoch_order(splits.train, torch.Generator().manual_seed(config.seed))
    images = take(splits.train, order[:config.calibration_batches * config.calibration_batch_size])[0]
    return _array(normalize(images, splits.mean, splits.std))


def _array(batch: torch.Tensor) -> np.ndarray:
    """A batch on the CPU as ONNX Runtime takes it: float32, or int64 token ids as they are."""
    return batch.cpu().numpy() if batch.dtype == torch.int64 else batch.cpu().float().numpy()


def quantize_onnx(fp32: bytes, calibration: np.ndarray, config: QuantizeConfig, fp32_layers: tuple[str, ...] = (),
                  inputs: InputSpec | None = None) -> bytes:
    """The int8 ONNX model of `fp32` (ONNX bytes), calibrated on `calibration` (N, C, H, W, normalised; `inputs`:
    what the examples are, where they are not images — token ids of several parts are fed part by part);
    `fp32_layers` (module names) stay in fp32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batch = config.calibration_batch_size

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else ort.feeds(inputs, calibration[start:start + batch])

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="searchsvc-int8-") as folder:
        source, prepared, target = (Path(folder) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(fp32)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)  # folds BN, infers shapes
        # The exporter names a layer's nodes after its scope: layer1.0.conv1.0 → /layer1/layer1.0/conv1/conv1.0/Conv
        scopes = tuple("/" + "/".join(_scope(name)) + "/" for name in fp32_layers)
        graph = onnx.load(str(prepared)).graph
        nodes = [n.name for n in graph.node if n.name.startswith(scopes)] if scopes else []
        attention = any(n.op_type == "Softmax" for n in graph.node)
        quantize_static(str(prepared), str(target), Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[config.method],
                        nodes_to_exclude=nodes, op_types_to_quantize=WEIGHTED_OPS if attention else None)
        return compact_names(target.read_bytes())


# A network with attention (a Softmax in its graph) is quantized in its weighted operators alone: quantizing every
# activation — attention masks of -inf, softmax, layer norms — cost a text encoder 33 points of F1 (0.92 → 0.59;
# these alone: 0.92), what int8 transformer deployments do too. Convolutional networks keep every operator.
WEIGHTED_OPS = ["Conv", "MatMul", "Gemm", "Gather"]


def _scope(module_name: str) -> list[str]:
    """The exporter's scope path of a module: an attribute by its name, a container's numbered child by the
    attribute it sits in and its index ("features.0.0" → features / features.0 / features.0.0)."""
    parts, scope, named = module_name.split("."), [], 0
    for i, part in enumerate(parts):
        if not part.isdigit():
            named = i
        scope.append(".".join(parts[named : i + 1]))
    return scope


def compact_names(model: bytes) -> bytes:
    """The ONNX model with short tensor names and no node names. The quantizer names each of its tensors
    after the layer's path ("/layer1/layer1.0/conv1/Conv_output_0_QuantizeLinear_Output"): in a small
    network those names weigh more than its int8 weights. The input and output keep theirs."""
    import onnx

    graph = onnx.load_from_string(model)
    kept = {ort.OUTPUT, *(info.name for info in graph.graph.input)}
    names: dict[str, str] = {}
    short = lambda name: name if name in kept or not name else names.setdefault(name, f"t{len(names)}")  # noqa: E731
    for node in graph.graph.node:
        node.name = ""
        node.input[:] = [short(name) for name in node.input]
        node.output[:] = [short(name) for name in node.output]
    for tensor in graph.graph.initializer:
        tensor.name = short(tensor.name)
    for info in (*graph.graph.value_info, *graph.graph.input, *graph.graph.output):
        info.name = short(info.name)
    onnx.checker.check_model(graph)
    return graph.SerializeToString()


def accuracy(model: bytes, split: Split, splits: Splits, threads: int, chunk: int = 512, task: Task | None = None
             ) -> float:
    """The task's metric (top-1, 0..1, by default) of an ONNX model run by ONNX Runtime on a split of `splits`,
    normalised a chunk at a time. The model's first output is its prediction (the exporter puts a dict's entries
    in order: torchvision's segmentation networks give "out" first)."""
    runner = ort.session(model, threads)
    metric = task.metric() if task is not None else None
    correct = 0
    for _, images, labels in batches(split, chunk):
        x = _array(normalize(images, splits.mean, splits.std))
        logits = runner.run([ort.OUTPUT], ort.feeds(splits.inputs, x))[0]
        if metric is not None:
            task.update(metric, torch.from_numpy(logits), labels.cpu())
        else:
            correct += int((logits.argmax(1) == labels.cpu().numpy()).sum())
    return task.score(metric) if metric is not None else correct / max(1, count(split))


def quantize_model(model: nn.Module, splits: Splits, config: QuantizeConfig, eval_threads: int = 2,
                   repeats: int = 10, fp32_layers: tuple[str, ...] = (), source: str = "ptq",
                   task: Task | None = None) -> Quantized:
    """Quantize `model` to int8 and measure it (`eval_threads`: ONNX Runtime's threads for the accuracy
    passes, which are not timed; `fp32_layers`: module names left in fp32; `source`: ptq, or qat for the
    end of quantization-aware training). Raises what export or the quantizer raise."""
    fp32 = ort.onnx_bytes(model, splits.inputs)
    calibration = calibration_images(splits, config)
    int8 = quantize_onnx(fp32, calibration, config, fp32_layers, splits.inputs)
    latency = lambda onnx, batch: ort.latency_ms(onnx, splits.inputs, batch, config.threads,  # noqa: E731
                                                 repeats if batch == 1 else max(1, repeats // 3))
    metrics = Int8Metrics(
        int8_accuracy=accuracy(int8, splits.test, splits, eval_threads, task=task),
        int8_val_accuracy=accuracy(int8, splits.val, splits, eval_threads, task=task),
        int8_latency_ms=latency(int8, 1), int8_latency_b256_ms=latency(int8, 256), int8_model_bytes=len(int8),
        fp32_ort_latency_ms=latency(fp32, 1), fp32_ort_latency_b256_ms=latency(fp32, 256), fp32_onnx_bytes=len(fp32),
        int8_threads=config.threads, int8_calibration_images=len(calibration), int8_source=source)
    return Quantized(int8, metrics)


QAT_KEY = "qat"  # the int8 folder of a candidate trained quantization-aware: candidates/<hash>/int8-qat/


def unless_unquantizable(spec_hash: str, make: Callable[[], Int8Metrics]) -> Int8Metrics | None:
    """`make()`, or None with a warning when the model cannot be quantized (ONNX cannot export it, or the
    quantizer fails on it): the candidate stays valid, without int8 figures, and a budget on them counts it
    as not measured. Store errors pass through: the run stops on those."""
    try:
        return make()
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 — any export or quantizer failure: this candidate's int8 only
        log.warning("candidate %s: no int8 model (%s: %s)", spec_hash, type(err).__name__, str(err)[:200])
        return None


def int8_prefix(spec_hash: str, config: QuantizeConfig | str) -> str:
    """Where a candidate's int8 model under `config` (or the QAT_KEY) lives."""
    return layout.int8_folder(spec_hash, config if isinstance(config, str) else config.key())


def stored_int8(store: ArtifactStore, spec_hash: str, config: QuantizeConfig | str) -> Int8Metrics | None:
    """The stored int8 measurement of a candidate under `config`, checked against its manifest and as a
    record; None if there is none (yet)."""
    prefix = int8_prefix(spec_hash, config)
    if not store.exists(layout.manifest(prefix)):
        return None
    source = store.uri_for(layout.file_in(prefix, layout.INT8_RECORD))
    try:
        data = json.loads(store.get_verified(prefix, layout.INT8_RECORD).decode("utf-8"))
        return records.from_data(Int8Metrics, data.get("metrics") if isinstance(data, dict) else None, source=source)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifactError(f"{source} is corrupt: not JSON ({err})") from None
    except RecordError as err:
        raise CorruptArtifactError(f"{source} is corrupt: {'; '.join(err.problems)}") from None


def stored_int8_model(store: ArtifactStore, spec_hash: str, config: QuantizeConfig | str) -> bytes:
    """The stored int8 ONNX model's bytes, checked against its manifest."""
    return store.get_verified(int8_prefix(spec_hash, config), layout.INT8_MODEL)


def save_int8(store: ArtifactStore, spec_hash: str, config: QuantizeConfig | str, quantized: Quantized,
              settings: dict[str, Any] | None = None) -> Int8Metrics:
    """Write the int8 folder once, every file write-once: two workers quantizing the same candidate at once
    (two runs) time it differently, and the second must not replace a record the first one's manifest
    vouches for. The one that loses waits for the other's manifest: theirs is the measurement. If none
    comes (the other writer died mid-save), this one's figures are reported, not stored."""
    prefix = int8_prefix(spec_hash, config)
    files = {layout.INT8_MODEL: quantized.onnx,
             layout.INT8_RECORD: json_bytes({"config": settings if settings is not None else asdict(config),
                                             "metrics": asdict(quantized.metrics)})}
    try:
        for name, data in files.items():
            store.put_bytes(layout.file_in(prefix, name), data, write_once=True)
        store.write_manifest(prefix, files)
    except WriteConflictError:
        deadline = time.monotonic() + OTHER_WRITER_S
        while time.monotonic() < deadline:
            stored = stored_int8(store, spec_hash, config)
            if stored is not None:
                return stored
            time.sleep(0.2)
        log.warning("candidate %s: another writer's int8 folder %s has no manifest after %.0f s; its figures are "
                    "reported, not stored", spec_hash, prefix, OTHER_WRITER_S)
    return quantized.metrics

