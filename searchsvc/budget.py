"""Deployment budgets: where the compressed model must fit (`search.budget`, every search method).

    search:
      budget:
        macs: 14_000_000        # multiply-accumulates per image (non-zero MACs for a sparse model)
        latency_ms: 2.0         # at latency_batch, on the worker's torch device
        latency_batch: 1

Each stated limit is inclusive: a candidate is within budget when every stated quantity is at most its
limit. A sparse (unthinned) model is judged by its non-zero parameters and non-zero MACs — what a sparse
kernel would cost — while its latency is measured as it runs, so a missing speedup shows. Each result
row records `within_budget`; `searchsvc results` and the report lead with the best row within budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, TypeVar

from core.errors import SearchsvcError

log = logging.getLogger(__name__)
Setting = TypeVar("Setting")

# Latency is measured by every worker at these batch sizes (workers.measure): the columns a latency
# limit is judged by.
LATENCY_COLUMNS = {1: "latency_ms", 256: "latency_b256_ms"}


@dataclass(frozen=True)
class Budget:
    """Limits a deployed model must meet; any subset, each inclusive."""

    macs: int | None = field(default=None, metadata={
        "gt": 0, "help": "multiply-accumulates per image, at most (a sparse model: those of its non-zero weights)"})
    params: int | None = field(default=None, metadata={
        "gt": 0, "help": "parameters, at most (a sparse model: its non-zero ones)"})
    model_bytes: int | None = field(default=None, metadata={"gt": 0, "help": "bytes of the saved model, at most"})
    latency_ms: float | None = field(default=None, metadata={
        "gt": 0, "help": "forward-pass milliseconds at latency_batch, at most (median, on the worker's device)"})
    latency_batch: int | None = field(default=None, metadata={
        "choices": sorted(LATENCY_COLUMNS), "help": "batch size latency_ms is measured at: 1 or 256"})
    latency_backend: Literal["torch"] = field(default="torch", metadata={
        "help": "torch: the worker's own device (ONNX Runtime on CPU is planned)"})

    def __post_init__(self) -> None:
        if not self.limits():
            raise ValueError(": name at least one limit (macs, params, model_bytes or latency_ms)")
        if self.latency_ms is not None and self.latency_batch is None:
            raise ValueError("latency_batch: a latency budget needs the batch size it is measured at (1 or 256)")
        if self.latency_ms is None and self.latency_batch is not None:
            raise ValueError("latency_batch: given without latency_ms, the limit it belongs to")

    def limits(self) -> dict[str, float]:
        """The stated limits by quantity name."""
        stated = {"macs": self.macs, "params": self.params, "model_bytes": self.model_bytes,
                  "latency_ms": self.latency_ms}
        return {name: limit for name, limit in stated.items() if limit is not None}

    def label(self) -> str:
        """The limits as text: "macs <= 14,000,000; latency_ms <= 2 (batch 1)"."""
        text = "; ".join(f"{name} <= {format_number(limit)}" for name, limit in self.limits().items())
        return text + (f" (batch {self.latency_batch})" if self.latency_ms is not None else "")

    def columns(self, quantity: str) -> tuple[str, ...]:
        """The result columns a quantity is read from, the first one present winning (a sparse model's
        non-zero count before its dense one)."""
        if quantity == "latency_ms":
            return (LATENCY_COLUMNS[self.latency_batch or 1],)
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


def format_number(value: float) -> str:
    """A limit or a measured value as text: thousands separated, small values as they are."""
    return f"{value:,.0f}" if value >= 100 else f"{value:g}"


def budget_of(search: Any) -> Budget | None:
    """The `budget` of a method's search section, if it has one and it is set."""
    return getattr(search, "budget", None)


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
