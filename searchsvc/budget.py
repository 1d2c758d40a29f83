"""Deployment budgets: where the compressed model must fit (`search.budget`, every search method).

    search:
      budget:
        macs: 14_000_000        # multiply-accumulates per image (non-zero MACs for a sparse model)
        latency_ms: 2.0         # at latency_batch, on the worker's torch device or with ONNX Runtime
        latency_batch: 1
        latency_backend: onnxruntime   # torch (default): the worker's own device
        latency_threads: 1      # ONNX Runtime's CPU threads (onnxruntime only; default 1)

Each stated limit is inclusive: a candidate is within budget when every stated quantity is at most its
limit. A sparse (unthinned) model is judged by its non-zero parameters and non-zero MACs — what a sparse
kernel would cost — while its latency is measured as it runs, so a missing speedup shows. Latency at batch 1
and 256 on torch is measured for every kept candidate; another setting is a `LatencyProbe` the workers time
each candidate with too (workers.measurement.latency), stored candidates included. Each result
row records `within_budget`; `searchsvc results` and the report lead with the best row within budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, TypeVar

from core.errors import SearchsvcError
from workers.measurement.latency import LatencyCost, LatencyProbe
from workers.measurement.run_measures import Measures

if TYPE_CHECKING:  # both import this module: types only
    from searchsvc.config import JobConfig
    from searchsvc.registry import SearchSection

log = logging.getLogger(__name__)
Setting = TypeVar("Setting")

MAX_LATENCY_BATCH = 4096  # images per timed forward pass, at most


@dataclass(frozen=True)
class Budget:
    """Limits a deployed model must meet; any subset, each inclusive."""

    macs: int | None = field(default=None, metadata={
        "gt": 0, "help": "multiply-accumulates per image, at most (a sparse model: those of its non-zero weights)"})
    params: int | None = field(default=None, metadata={
        "gt": 0, "help": "parameters, at most (a sparse model: its non-zero ones)"})
    model_bytes: int | None = field(default=None, metadata={"gt": 0, "help": "bytes of the saved model, at most"})
    int8_model_bytes: int | None = field(default=None, metadata={
        "gt": 0, "help": "bytes of the int8 ONNX model, at most (needs a quantize: section)"})
    int8_latency_ms: float | None = field(default=None, metadata={
        "gt": 0, "help": "int8 milliseconds at batch 1 with ONNX Runtime on quantize.threads, at most (needs quantize:)"})
    latency_ms: float | None = field(default=None, metadata={
        "gt": 0, "help": "forward-pass milliseconds at latency_batch, at most (median of several passes)"})
    latency_batch: int | None = field(default=None, metadata={
        "min": 1, "max": MAX_LATENCY_BATCH, "help": "images per forward pass latency_ms is measured at"})
    latency_backend: Literal["torch", "onnxruntime"] = field(default="torch", metadata={
        "omit_default": True, "help": "torch: on the worker's own device (bf16 autocast on a GPU); onnxruntime: "
                                      "the model exported to ONNX, run by ONNX Runtime on the worker's CPU"})
    latency_threads: int | None = field(default=None, metadata={
        "min": 1, "help": "ONNX Runtime's intra-op CPU threads (latency_backend: onnxruntime; default 1)"})

    def __post_init__(self) -> None:
        if not self.limits():
            raise ValueError(": name at least one limit (macs, params, model_bytes, latency_ms, int8_model_bytes or "
                             "int8_latency_ms)")
        if self.latency_ms is not None and self.latency_batch is None:
            raise ValueError("latency_batch: a latency budget needs the batch size it is measured at (e.g. 1)")
        if self.latency_ms is None and self.latency_batch is not None:
            raise ValueError("latency_batch: given without latency_ms, the limit it belongs to")
        if self.latency_threads is not None and self.latency_backend != "onnxruntime":
            raise ValueError("latency_threads: ONNX Runtime's threads; the torch backend runs on the worker's device "
                             "with its threads (set latency_backend: onnxruntime)")

    def probe(self) -> LatencyProbe | None:
        """The latency setting latency_ms is measured at; None without a latency limit."""
        if self.latency_ms is None:
            return None
        threads = (self.latency_threads or 1) if self.latency_backend == "onnxruntime" else None
        return LatencyProbe(self.latency_backend, self.latency_batch or 1, threads)

    def limits(self) -> dict[str, float]:
        """The stated limits by quantity name."""
        stated = {"macs": self.macs, "params": self.params, "model_bytes": self.model_bytes,
                  "latency_ms": self.latency_ms, "int8_model_bytes": self.int8_model_bytes,
                  "int8_latency_ms": self.int8_latency_ms}
        return {name: limit for name, limit in stated.items() if limit is not None}

    def cost(self, int8_threads: int = 1) -> tuple[str, float | None]:
        """The cost a pruning step ranks by and lands on (workers.compression.costs), and its limit: MACs or
        parameters where stated (MACs first), else latency (`latency_ms` on its probe, then `int8_latency_ms`:
        ONNX Runtime at batch 1 on `int8_threads`, quantize.threads), each priced by a per-layer latency table;
        bytes as parameters, with no limit a step can count (the trajectory still stops at the first measured
        point within budget)."""
        limits = self.limits()
        for name in ("macs", "params"):
            if name in limits:
                return name, limits[name]
        probe = self.probe()
        if probe is not None:
            return LatencyCost(probe).name, limits["latency_ms"]
        if "int8_latency_ms" in limits:
            return LatencyCost(LatencyProbe("onnxruntime", 1, int8_threads), int8=True).name, limits["int8_latency_ms"]
        return "params", None

    def label(self) -> str:
        """The limits as text: "macs <= 14,000,000; latency_ms <= 2 (batch 1)"."""
        text = "; ".join(f"{name} <= {format_number(limit)}" for name, limit in self.limits().items())
        probe = self.probe()
        return text + (f" ({probe.describe()})" if probe is not None else "")

    def columns(self, quantity: str) -> tuple[str, ...]:
        """The result columns a quantity is read from, the first one present winning (a sparse model's
        non-zero count before its dense one)."""
        if quantity == "latency_ms":
            return (self.probe().column,)
        if quantity in ("macs", "params"):
            return (f"nonzero_{quantity}", quantity)
        return (quantity,)

    def quantity(self, name: str, get: Callable[[str], Any]) -> float | None:
        """A candidate's value of quantity `name`, read with `get(column)`; None if it was not measured."""
        for column in self.columns(name):
            value = get(column)
            if value is not None:
                return float(value)
        return None

    def within(self, get: Callable[[str], Any]) -> bool | None:
        """Whether a candidate (its values read with `get(column)`) meets every limit; None when a limited
        quantity was not measured for it (an invalid candidate)."""
        verdict = True
        for name, limit in self.limits().items():
            value = self.quantity(name, get)
            if value is None:
                return None
            verdict = verdict and value <= limit
        return verdict

    def exceeded(self, get: Callable[[str], Any]) -> str:
        """Which measured quantities are over their limits, as one phrase ("" if none: within budget, or
        not measured)."""
        over = []
        for name, limit in self.limits().items():
            value = self.quantity(name, get)
            if value is not None and value > limit:
                over.append(f"{name} {format_number(value)} over the limit {format_number(limit)}")
        return "; ".join(over)

    def overshoot(self, get: Callable[[str], Any]) -> float:
        """The smallest limit / value ratio over the stated limits, capped at 1: 1.0 within budget, 0.5 for a
        candidate twice over its tightest limit (N2N scales its reward by it)."""
        ratios = [1.0]
        for name, limit in self.limits().items():
            value = self.quantity(name, get)
            if value is not None and value > 0:
                ratios.append(limit / value)
        return min(ratios)


def measure_problems(config: JobConfig) -> list[str]:
    """What keeps a run from measuring what its config asks (checked at validate, not when a stored run's
    config is read back): ONNX Runtime not installed for an onnxruntime latency budget or for `quantize:`, an
    int8 limit without a `quantize:` section to make the int8 model."""
    from workers.measurement import ort

    budget, quantize, problems = budget_of(config.search), getattr(config, "quantize", None), []
    missing = ort.NOT_INSTALLED
    if budget is not None and budget.latency_backend == "onnxruntime" and not ort.available():
        problems.append(f"search.budget.latency_backend: {missing}")
    if quantize is not None and not ort.available():
        problems.append(f"quantize.backend: {missing}")
    for name in ("int8_model_bytes", "int8_latency_ms"):
        if budget is not None and getattr(budget, name) is not None and quantize is None:
            problems.append(f"search.budget.{name}: limits the int8 model; add a quantize: section to make it")
    return problems


def format_number(value: float) -> str:
    """A limit or a measured value as text: thousands separated, small values as they are."""
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


def budget_of(search: SearchSection | None) -> Budget | None:
    """The `budget` of a method's search section, if it has one and it is set."""
    return getattr(search, "budget", None)


def probes_of(search: SearchSection | None) -> tuple[LatencyProbe, ...]:
    """The latency settings a search needs measured on every candidate beyond the standard ones: its
    budget's, if that is not torch at batch 1 or 256."""
    budget = budget_of(search)
    probe = budget.probe() if budget is not None else None
    return (probe,) if probe is not None and not probe.standard else ()


def measures_of(config: JobConfig) -> Measures:
    """What a run measures of each kept candidate beyond the standard metrics: its budget's latency probes,
    and int8 quantization with a `quantize:` section (workers.measurement.run_measures)."""
    return Measures(probes_of(config.search), getattr(config, "quantize", None))


def feasible(settings: list[Setting], budget: Budget, footprint: Callable[[Setting], dict[str, Any]],
             describe: Callable[[Setting], str], hint: str) -> list[Setting]:
    """The sweep settings whose `footprint` (their smallest model, known before training) meets the budget;
    each other one is skipped, named in the log. None left: a SearchsvcError naming search.budget, with `hint`."""
    kept, over = [], ""
    for setting in settings:
        over = budget.exceeded(footprint(setting).get)
        if over:
            log.warning("skipped %s: %s", describe(setting), over)
        else:
            kept.append(setting)
    if not kept:
        raise SearchsvcError(f"search.budget: no setting of the sweep can meet it ({over}); {hint}")
    return kept
