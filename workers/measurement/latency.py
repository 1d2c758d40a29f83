"""Latency where the user deploys: a `LatencyProbe` names a backend, a batch size and (ONNX Runtime) a thread
count, and the result column it is recorded in.

Every kept candidate is timed on its worker's torch device at batch 1 and 256 (`latency_ms`,
`latency_b256_ms`: workers.measurement.measure). A budget that asks for another setting (`search.budget`:
`latency_backend: onnxruntime`, `latency_threads`, any `latency_batch`) hands its probe to the workers,
which time each candidate with it too, into a column of its own (`ort_latency_b1_t1_ms`). A candidate found
in the store without that column is timed again from its stored model, never retrained (workers.measurement.run_measures).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported where a model is timed, not where a budget is read
    import torch
    from torch import nn

    from workers.models.inputs import InputSpec

log = logging.getLogger(__name__)
Backend = Literal["torch", "onnxruntime"]

# Columns every kept candidate has: torch on the worker's device at these batch sizes (workers.measurement.measure).
STANDARD_COLUMNS = {1: "latency_ms", 256: "latency_b256_ms"}
# The repeats a probe's median is taken over: fewer at large batches, whose medians settle sooner.
REPEATS, LARGE_BATCH_REPEATS, LARGE_BATCH = 10, 3, 64


@dataclass(frozen=True)
class LatencyProbe:
    """One latency measurement setting. `threads`: ONNX Runtime's intra-op threads (None with torch, which
    runs on the worker's device with the worker's threads)."""

    backend: Backend = "torch"
    batch: int = 1
    threads: int | None = None

    @property
    def column(self) -> str:
        """The result column it is recorded in, in milliseconds."""
        if self.backend == "onnxruntime":
            return f"ort_latency_b{self.batch}_t{self.threads}_ms"
        return STANDARD_COLUMNS.get(self.batch, f"latency_b{self.batch}_ms")

    @property
    def standard(self) -> bool:
        """Measured for every kept candidate anyway (torch at batch 1 or 256): nothing extra to do."""
        return self.backend == "torch" and self.batch in STANDARD_COLUMNS

    @property
    def repeats(self) -> int:
        """Passes a timing of this probe takes: fewer at large batches, whose medians settle sooner."""
        return LARGE_BATCH_REPEATS if self.batch >= LARGE_BATCH else REPEATS

    def describe(self) -> str:
        """The setting as words: "ONNX Runtime on 1 CPU thread, batch 1"."""
        if self.backend == "onnxruntime":
            return f"ONNX Runtime on {self.threads} CPU thread{'s' if self.threads != 1 else ''}, batch {self.batch}"
        return f"torch on the worker's device, batch {self.batch}"


INT8 = "int8_"  # a latency cost's prefix: the int8 model's latency (ONNX Runtime only)


@dataclass(frozen=True)
class LatencyCost:
    """Latency as a step's cost: a probe (backend, batch, threads), of the fp32 model or of its int8 model."""

    probe: LatencyProbe
    int8: bool = False

    @property
    def name(self) -> str:
        """The cost's name in a spec: the probe's result column, "int8_"-prefixed for the int8 model."""
        return (INT8 if self.int8 else "") + self.probe.column

    @classmethod
    def parse(cls, name: str) -> LatencyCost | None:
        """The latency cost a name stands for (`name`'s inverse); None for a counted cost (macs, params)."""
        int8, rest = name.startswith(INT8), name.removeprefix(INT8)
        if rest == "latency_ms":
            probe = LatencyProbe("torch", 1)
        elif found := re.fullmatch(r"latency_b(\d+)_ms", rest):
            probe = LatencyProbe("torch", int(found[1]))
        elif found := re.fullmatch(r"ort_latency_b(\d+)_t(\d+)_ms", rest):
            probe = LatencyProbe("onnxruntime", int(found[1]), int(found[2]))
        else:
            return None
        if int8 and probe.backend != "onnxruntime":
            raise ValueError(f"cost {name!r}: an int8 model's latency is timed with ONNX Runtime")
        return cls(probe, int8)


# Column names of probes, for readers that meet them in rows and reports (a latency, milliseconds).
PROBE_COLUMN = re.compile(r"^(ort_latency_b\d+_t\d+_ms|latency_b\d+_ms)$")


def probe_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(column, title, format) of each probe's latency some row has (not the standard ones, shown anyway),
    for the tables of `results`, the report and `compare`: "ort_latency_b1_t1_ms" → "ORT b1 t1 ms"."""
    found = sorted({k for row in rows for k, v in row.items() if v is not None and PROBE_COLUMN.match(k)})
    found = [k for k in found if k not in STANDARD_COLUMNS.values()]
    title = lambda k: k.removesuffix("_ms").replace("ort_latency_", "ORT ").replace("latency_", "torch ")  # noqa: E731
    return [(k, f"{title(k).replace('_', ' ')} ms", "{:.2f}") for k in found]


def measure_probes(model: nn.Module, probes: tuple[LatencyProbe, ...], device: torch.device, inputs: InputSpec
                   ) -> dict[str, float]:
    """Each non-standard probe's latency of `model`, by column (`time_probe`; a probe that failed is left out)."""
    timed = {p.column: time_probe(model, p, device, inputs) for p in probes if not p.standard}
    return {column: value for column, value in timed.items() if value is not None}


def time_probe(model: nn.Module, probe: LatencyProbe, device: torch.device, inputs: InputSpec) -> float | None:
    """The latency of `model` at `probe`, milliseconds (torch: on `device`). None when ONNX cannot export the
    model or ONNX Runtime cannot run it: a warning, and a budget on it counts the candidate as not measured,
    never within."""
    repeats = probe.repeats
    if probe.backend == "torch":
        from workers.measurement.measure import latency_ms

        return latency_ms(model, device, inputs, probe.batch, repeats)
    from workers.measurement import ort

    try:
        exported = ort.onnx_bytes(model, inputs)
        return ort.latency_ms(exported, inputs, probe.batch, probe.threads or 1, repeats)
    except Exception as err:  # noqa: BLE001 — any export or runtime failure: this probe only
        log.warning("%s: not measured (%s: %s)", probe.describe(), type(err).__name__, str(err)[:200])
        return None
