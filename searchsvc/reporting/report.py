"""One self-contained HTML report of a run: summary, Pareto fronts, the top candidates, the method's plots.

    searchsvc report --store URI --run ID -o report.html

Everything comes from the store (config.yaml, run.json, results.parquet, the teacher's meta.json, the
PNGs a method stored under runs/<id>/plots/); images are inlined as base64 PNG, so the file can be
mailed or archived and opens without a network.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from core.records import from_data
from searchsvc.budget import Budget
from searchsvc.reporting.plots import front_png, progress_png, schedule_png
from searchsvc.reporting.rows import ResultRow, most_accurate, pareto_front, stored_rows
from searchsvc.reporting.table import rank, results_table, stored_config, stored_record
from searchsvc.reporting.text_table import metric_title
from storage import ArtifactStore, layout
from workers.measurement.latency import probe_columns
from workers.measurement.measure import count_macs, count_parameters
from workers.measurement.metrics import verified_metrics
from workers.models.inputs import InputSpec
from workers.training.teacher import load_teacher

# (metric, axis title, unit) of the Pareto plots; accuracy is always the other axis.
FRONTS = [("params", "parameters", "count"), ("macs", "MACs per image", "count"),
          ("latency_ms", "latency at batch 1", "ms")]
TOP_COLUMNS = [("val_accuracy", "val accuracy", "{:.2%}"), ("accuracy", "test accuracy", "{:.2%}"),
               ("params", "params", "{:,}"), ("macs", "MACs", "{:,}"),
               ("latency_ms", "latency ms", "{:.2f}"), ("compression", "x-factor", "{:.2f}"),
               ("reward", "reward", "{:.3f}"), ("sparsity", "sparsity", "{:.3f}"),
               ("nonzero_macs", "non-zero MACs", "{:,}"), ("rigl_updates", "RigL updates", "{}"),
               ("within_budget", "within budget", "{}"), ("int8_accuracy", "int8 test accuracy", "{:.2%}"),
               ("int8_val_accuracy", "int8 val accuracy", "{:.2%}"), ("int8_latency_ms", "int8 CPU ms", "{:.3f}"),
               ("int8_model_bytes", "int8 bytes", "{:,}")]
# Methods whose candidates record a sparsity schedule per epoch: (history key, axis title) per panel.
SCHEDULES = {"agp": [("sparsity", "sparsity (%)")],
             "rigl": [("density", "non-zero weights (%)"), ("moved", "weights moved in the epoch (% of non-zero)")]}
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}img{max-width:100%}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}"""


def teacher_point(store: ArtifactStore, teacher_hash: str | None) -> dict[str, Any]:
    """The teacher as a row of the plots: accuracy, params and MACs of the stored teacher (zoo or user model,
    every file checked against its manifest)."""
    if not teacher_hash or not store.exists(layout.manifest(layout.teacher(teacher_hash))):
        return {}
    teacher = load_teacher(store, teacher_hash)
    meta = teacher.meta
    return {"accuracy": meta["test_accuracy"], "params": count_parameters(teacher.model),
            "macs": count_macs(teacher.model, InputSpec.from_meta(meta)), "latency_ms": None}


def run_summary(record: dict[str, Any], rows: list[ResultRow], gpus_per_eval: float) -> list[tuple[str, str]]:
    """(label, value) pairs of the run: status, teacher, counts, wall time and GPU-hours."""
    trained = [r for r in rows if not r.cached]
    on_gpu = [r for r in trained if _on_gpu(r)] if gpus_per_eval else []
    gpu_hours = gpu_hours_of(rows, gpus_per_eval)
    return [("run", record.get("run_id", "?")), ("method", str(record.get("method"))),
            ("status", str(record.get("status"))), ("started", str(record.get("started_at", "-"))),
            ("teacher", f"{record.get('teacher_hash', '-')} ({100 * (record.get('teacher_val_accuracy') or 0):.2f} % "
                        f"validation, {100 * (record.get('teacher_accuracy') or 0):.2f} % test)"),
            ("evaluations", f"{len(trained)} trained, {len(rows) - len(trained)} from the store (cache hits)"),
            ("valid", f"{sum(r.ok for r in rows)} of {len(rows)}"),
            ("wall time", f"{(record.get('wall_s') or 0) / 60:.1f} min"),
            ("GPU-hours", f"{gpu_hours:.3f} ({gpus_per_eval:g} GPU per evaluation)" if on_gpu
             else "0 (evaluations ran on the CPU)")]


def budget_summary(budget: Any, ok: list[ResultRow]) -> list[tuple[str, str]]:
    """The run's budget (its stored `search.budget`), how many valid candidates meet it, and the most
    accurate of them on validation (the model `searchsvc compare` hands over for this budget)."""
    if not isinstance(budget, dict):
        return []
    within = [r for r in ok if r.within_budget]
    best = most_accurate(within)
    return [("budget", from_data(Budget, budget, path="search.budget").label()),
            ("within budget", f"{len(within)} of {len(ok)} valid candidates")] + (
        [("most accurate within budget", f"{best.spec_hash}: {100 * best.val_accuracy:.2f} % validation, "
                                         f"{100 * best.accuracy:.2f} % test")] if best else [])


def gpu_hours_of(rows: list[ResultRow], gpus_per_eval: float) -> float:
    """GPU-hours of a run's evaluations: each one trained by this run on a GPU, at its share of the GPU."""
    on_gpu = [r for r in rows if not r.cached and _on_gpu(r)] if gpus_per_eval else []
    return gpus_per_eval * sum(r.wall_s for r in on_gpu) / 3600


def _on_gpu(row: ResultRow) -> bool:
    """Whether an evaluation ran on a GPU (rows from before `device` was recorded: as the config asked)."""
    return row.device is None or row.device.startswith("cuda")


def build_report(store: ArtifactStore, run_id: str, top: int = 10) -> str:
    """The HTML text of run `run_id`'s report."""
    record = stored_record(store, run_id)
    config_text, config = stored_config(store, run_id)
    rows = stored_rows(store, run_id)
    teacher = teacher_point(store, record.get("teacher_hash"))
    gpus = float((config.get("resources") or {}).get("gpus_per_eval") or 0)
    ok = [r for r in rows if r.ok]
    summary = run_summary(record, rows, gpus) + budget_summary((config.get("search") or {}).get("budget"), ok)
    scored_by = record.get("metric")
    if scored_by:  # a task's metric (issue 37): the columns named accuracy hold it
        summary = [["metric", f"{scored_by} (in every accuracy column)"], *summary]
    parts = [f"<h1>searchsvc run {escape(run_id)}</h1>", "<h2>Summary</h2>", table_html(["", ""], summary)]
    parts.append("<h2>Pareto fronts (test accuracy vs size and speed; ★ the teacher)</h2>"
                 "<p>Each front is chosen on validation accuracy and drawn at test accuracy, which only reports; "
                 "the ranking below is by reward (validation), with both accuracies shown.</p><div class='grid'>")
    for metric, title, unit in FRONTS:
        points = [r for r in ok if r.get(metric) is not None]
        if points:
            front = pareto_front(points, metric)
            parts.append(img_html(front_png(points, front, metric, f"{title} ({unit})", teacher), f"accuracy vs {title}"))
    parts.append("</div>")
    parts.append(f"<h2>Top {top}</h2>" + top_table(ok, top, scored_by))
    parts.append("<h2>The search over time</h2>" + img_html(progress_png(rows), "reward and accuracy per evaluation"))
    if record.get("method") in SCHEDULES and ok:
        parts.append("<h2>Sparsity schedule</h2>" + img_html(schedule_plot(store, ok, record["method"], top), "schedule"))
    for key in store.list(layout.plots_prefix(run_id)):
        if key.endswith(".png"):
            parts.append(f"<h3>{escape(key.rsplit('/', 1)[1])}</h3>" + img_html(store.get_bytes(key), key))
    parts.append(f"<h2>Config</h2><pre>{escape(config_text)}</pre>")
    body = "\n".join(parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>searchsvc {escape(run_id)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def schedule_plot(store: ArtifactStore, ok: list[ResultRow], method: str, top: int) -> bytes:
    """The per-epoch schedule of the best `top` candidates, from their stored training histories."""
    best = ranked(ok)[:top]
    histories = {f"{r.spec_hash[:8]} ({100 * r.accuracy:.1f} %)":
                 list(verified_metrics(store, r.spec_hash).history or ()) for r in best}
    return schedule_png(histories, SCHEDULES[method], f"{method}: the best {len(best)} candidates")


def ranked(rows: list[ResultRow]) -> list[ResultRow]:
    """`rows` best first: the order of results.parquet and `searchsvc results` (the table only ranks them)."""
    by_hash = {row.spec_hash: row for row in rows}
    return [by_hash[spec_hash] for spec_hash in rank(results_table(rows))["spec_hash"].to_pylist()]


def top_table(rows: list[ResultRow], top: int, metric: str | None = None) -> str:
    """The best `top` valid candidates by reward, with links to their kept models (`metric`: the task's, named in
    the accuracy columns' titles)."""
    best = ranked(rows)[:top]
    columns = [c for c in TOP_COLUMNS if any(r.get(c[0]) is not None for r in best)]
    columns += probe_columns([r.to_data() for r in best])
    body = []
    for place, row in enumerate(best, start=1):
        cells = [str(place), escape(row.spec_hash)]
        cells += ["-" if row.get(k) is None else fmt.format(row.get(k)) for k, _, fmt in columns]
        link = row.artifact
        cells.append(f"<a href='{escape(link)}'>{layout.MODEL}</a>" if link else "-")
        body.append(cells)
    titles = (metric_title(title, metric) for _, title, _ in columns)
    return table_html(["#", "candidate", *titles, "artifact"], body, raw=True)


def table_html(header: list[str], rows: list, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (they hold markup: links)."""
    def cell(value: Any) -> str:
        return str(value) if raw else escape(str(value))

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img_html(png: bytes, alt: str) -> str:
    """An inline PNG (base64): the page needs nothing beside it."""
    return f"<img alt='{escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def escape(text: str) -> str:
    """`text` safe inside HTML text and attribute values."""
    return html.escape(text, quote=True)
