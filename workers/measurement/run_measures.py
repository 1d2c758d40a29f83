"""What a run measures of every kept candidate beyond the standard metrics (workers.measurement.measure): the latency
probes its budget asks for (workers.measurement.latency) and, with a `quantize:` section, the int8 model and its figures
(workers.compression.quantize).

Neither is part of a candidate's identity: the same candidate serves runs with other budgets and other
quantization settings. So a candidate found in the store is completed, never retrained: it is timed at the
probes it lacks, and quantized unless its int8 folder for this setting is stored already. Probe columns
are stored with a freshly measured candidate (their names carry their setting); int8 figures live in the
int8 folder only (`candidates/<hash>/int8-<key>/`), and reach the run's rows through the metrics a worker
returns. The exception: a candidate trained quantization-aware (workers.compression.qat) keeps its int8 figures in its
own metrics, since its int8 model is what it was trained for; a `quantize:` section leaves it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.compression.quantize import INT8_COLUMNS, QuantizeConfig
from workers.measurement.latency import PROBE_COLUMN, LatencyProbe


@dataclass(frozen=True)
class Measures:
    """A run's extra measurements of each kept candidate."""

    probes: tuple[LatencyProbe, ...] = ()  # latency settings beyond torch at batch 1 and 256
    quantize: QuantizeConfig | None = None  # int8 quantization and its figures; None: none

    def missing_probes(self, metrics: Any) -> tuple[LatencyProbe, ...]:
        """The probes a kept, valid candidate's metrics lack."""
        if not kept(metrics):
            return ()
        return tuple(p for p in self.probes if not p.standard and metrics.get(p.column) is None)

    def needs_int8(self, metrics: Any) -> bool:
        """Whether a kept, valid candidate's metrics lack the int8 figures of this run."""
        return self.quantize is not None and kept(metrics) and metrics.get("int8_accuracy") is None

    def incomplete(self, metrics: Any) -> bool:
        """Whether the candidate must be completed (timed or quantized) before its row is recorded."""
        return bool(self.missing_probes(metrics)) or self.needs_int8(metrics)


def kept(metrics: Any) -> bool:
    """A valid candidate whose model was kept: the only kind with a latency or an int8 model."""
    return metrics.status == "ok" and metrics.artifact is not None


def is_run_column(name: str) -> bool:
    """A column measured for a run's own settings (a probe's latency, an int8 figure), which the candidate's
    stored metrics.json need not hold: a trial reports it with the row (searchsvc.sweeps.tuner)."""
    return bool(PROBE_COLUMN.match(name)) or name in INT8_COLUMNS


def run_columns(metrics: Any) -> dict[str, Any]:
    """The run-specific columns of a candidate's metrics, for its row."""
    return {name: value for name, value in metrics.extra.items() if is_run_column(name) and value is not None}
