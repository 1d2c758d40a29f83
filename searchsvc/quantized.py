"""`searchsvc quantize`: int8 post-training quantization of one kept candidate, after its run.

    searchsvc quantize --store URI SPEC_HASH [-o model.onnx] [--calibration-batches 8] [--threads 1]

The candidate's stored model (checked against its manifest) is exported to ONNX, calibrated on training batches of
its own dataset (read where the newest run on that data read it: a spec does not record where files are), quantized
by ONNX Runtime and measured (workers.compression.quantize); the int8 model and its figures are stored beside the
candidate, `candidates/<hash>/int8-<key>/`, under their own manifest. Asked again with the same settings, the stored
int8 model is used (checked like every stored byte).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from core.records import RecordError
from searchsvc.config import parse_config
from searchsvc.reporting.table import stored_config
from searchsvc.reporting.text_table import metric_title
from storage import ArtifactStore, CorruptArtifactError, KeyNotFoundError, layout
from workers.compression.quantize import (
    Int8Metrics,
    QuantizeConfig,
    int8_prefix,
    quantize_model,
    save_int8,
    stored_int8,
)
from workers.data.datasets import DatasetConfig, load_dataset
from workers.evaluation.evaluate import load_candidate_model
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import CandidateMetrics, stored_metrics
from workers.training.task import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOutcome:
    """A candidate's fp32 metrics beside its int8 figures, and where the int8 model is."""

    fp32: CandidateMetrics
    int8: Int8Metrics
    stored_already: bool  # the int8 model of these settings was in the store: nothing was quantized
    uri: str  # the stored int8 ONNX model
    metric: str | None = None  # the task's metric where it is not top-1 accuracy (what the two accuracies hold)


def quantize_candidate(store: ArtifactStore, spec_hash: str, config: QuantizeConfig) -> QuantizeOutcome:
    """Quantize a kept candidate (or find it quantized) and store the int8 model beside it. KeyNotFoundError
    for a candidate the store does not hold, or one without a kept model."""
    model = load_candidate_model(store, spec_hash)  # every file checked; refuses a candidate with no model
    fp32 = stored_metrics(store, spec_hash)
    uri = store.uri_for(layout.file_in(int8_prefix(spec_hash, config), layout.INT8_MODEL))
    spec = CandidateSpec.from_json(store.get_verified(layout.candidate(spec_hash), layout.SPEC).decode())
    metric = spec.train.task.metric_name if spec.train.task is not None and spec.train.task.metric else None
    stored = stored_int8(store, spec_hash, config)
    if stored is not None:
        return QuantizeOutcome(fp32, stored, True, uri, metric)
    splits = load_dataset(candidate_data(store, spec.dataset), getattr(store, "endpoint", None))
    quantized = quantize_model(model, splits, config, eval_threads=os.cpu_count() or 1, task=Task(spec.train.task))
    return QuantizeOutcome(fp32, save_int8(store, spec_hash, config, quantized), False, uri, metric)


def candidate_data(store: ArtifactStore, data: DatasetConfig) -> DatasetConfig:
    """Where a candidate's data is read from: a spec records what the data is, not where its files are
    (`DatasetConfig.identity`: no root), so the newest run in the store that read the same data says where
    (its config's dataset: root, in_memory, workers); without one, the spec's own (files looked for in known
    places)."""
    for run_id in reversed(layout.list_runs(store)):
        try:
            config = parse_config(stored_config(store, run_id)[1])
        except (RecordError, KeyNotFoundError, CorruptArtifactError):  # a run stopped before its config was
            continue  # stored, or one this version cannot read: not the place to learn where data is
        stated = replace(config.dataset, fingerprint=data.fingerprint)  # the config was stored before the data
        if stated.identity() == data:  # was read; loading checks the files are still those the spec was trained on
            log.info("dataset %s read as run %s read it", data.name, run_id)
            return stated
    return data


def comparison_rows(outcome: QuantizeOutcome) -> list[list[str]]:
    """fp32 against int8, a row per figure: what `searchsvc quantize` prints."""
    fp32, int8 = outcome.fp32, outcome.int8
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    ms = lambda v: f"{v:.3f}"  # noqa: E731
    threads = f"{int8.int8_threads} CPU thread{'s' if int8.int8_threads != 1 else ''}"
    return [[metric_title("test accuracy", outcome.metric), pct(fp32.accuracy), pct(int8.int8_accuracy)],
            [metric_title("val accuracy", outcome.metric), pct(fp32.val_accuracy), pct(int8.int8_val_accuracy)],
            [f"latency ms, batch 1 (ONNX Runtime, {threads})", ms(int8.fp32_ort_latency_ms), ms(int8.int8_latency_ms)],
            [f"latency ms, batch 256 (ONNX Runtime, {threads})", ms(int8.fp32_ort_latency_b256_ms),
             ms(int8.int8_latency_b256_ms)],
            ["ONNX model bytes", f"{int8.fp32_onnx_bytes:,}", f"{int8.int8_model_bytes:,}"]]
