"""Result rows as the plain-text table `searchsvc run` and `searchsvc results` print."""

from __future__ import annotations

from searchsvc.reporting.rows import ResultRow
from workers.measurement.latency import probe_columns

_COLUMNS = [("spec_hash", "spec_hash", "{}"), ("method", "method", "{}"), ("status", "status", "{}"),
            ("reward", "reward", "{:.4f}"), ("compression", "x-factor", "{:.2f}"),
            ("val_accuracy", "val acc", "{:.4f}"), ("accuracy", "test acc", "{:.4f}"),
            ("params", "params", "{:,}"), ("macs", "MACs", "{:,}"), ("latency_ms", "latency ms", "{:.2f}"),
            ("finetuned_from", "built from", "{}"), ("artifact", "artifact", "{}")]
# Method-specific columns, shown after `status` when the run has them (Tune methods: trial, iteration;
# sparse methods: sparsity of the conv / linear weights, 0..1; rigl: mask updates, 0 for the static baseline).
_OPTIONAL = [("trial", "trial", "{}"), ("iteration", "iter", "{}"), ("pareto", "pareto", "{}"),
             ("within_budget", "in budget", "{}"), ("nonzero_macs", "nz MACs", "{:,}"),
             ("sparsity", "sparsity", "{:.3f}"), ("rigl_updates", "updates", "{}")]
# With a `quantize:` section: the int8 model's test accuracy, its CPU latency at batch 1 and its bytes.
_INT8 = [("int8_accuracy", "int8 test acc", "{:.4f}"), ("int8_latency_ms", "int8 ms", "{:.3f}"),
         ("int8_model_bytes", "int8 bytes", "{:,}")]


def format_table(rows: list[ResultRow], metric: str | None = None) -> str:
    """A plain-text table of result rows, ranked as given; `metric`: the task's metric the accuracy columns hold
    (their titles name it), None for top-1 accuracy."""
    if not rows:
        return "(no results yet)"
    optional = [c for c in _OPTIONAL if any(row.get(c[0]) is not None for row in rows)]
    int8 = [c for c in _INT8 if any(row.get(c[0]) is not None for row in rows)]
    probes = probe_columns([row.to_data() for row in rows])
    columns = _COLUMNS[:3] + optional + _COLUMNS[3:10] + probes + int8 + _COLUMNS[10:]
    header = ["#"] + [metric_title(title, metric) for _, title, _ in columns]
    body = [[str(rank)] + ["-" if row.get(key) is None else fmt.format(row.get(key)) for key, _, fmt in columns]
            for rank, row in enumerate(rows, start=1)]
    return plain_table(header, body)


def metric_title(title: str, metric: str | None) -> str:
    """A column title with the task's metric for "acc"/"accuracy" ("val acc" → "val MulticlassJaccardIndex")."""
    if metric is None:
        return title
    return title.replace(" accuracy", f" {metric}").replace(" acc", f" {metric}")


def plain_table(header: list[str], body: list[list[str]]) -> str:
    """Cells in left-aligned columns under a header and a rule."""
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header] + body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])
