"""`searchsvc compare`: runs on one teacher side by side, in one self-contained HTML page.

    searchsvc compare --store URI --run A --run B ... -o compare.html [--budget macs=14000000] [--allow-mixed]

The question it answers: which method gives the most accurate model under my budget? For every run (named
by its id and method): its Pareto fronts overlaid on the others' (test accuracy against params, MACs and
latency; the teacher ★), and per budget — each run's own `search.budget`, each `--budget`, and none — the
model it would hand over: the most accurate on validation among its valid candidates within the budget,
shown with its test accuracy (which only reports). Then each run's wall time and GPU-hours. Runs on
different teachers or datasets are refused unless `--allow-mixed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import SearchsvcError
from core.records import RecordError, from_data
from searchsvc.budget import Budget
from searchsvc.reporting.plots import overlay_png
from searchsvc.reporting.report import FRONTS, STYLE, escape, gpu_hours_of, img_html, table_html, teacher_point
from searchsvc.reporting.rows import ResultRow, most_accurate, stored_rows
from searchsvc.reporting.table import stored_config, stored_record
from searchsvc.reporting.text_table import metric_title
from storage import ArtifactStore, check_id, layout

BudgetChoice = tuple[str, Budget | None]  # (label, the budget; None: any size)


@dataclass(frozen=True)
class RunView:
    """What `compare` reads of one run: its record, stored config and every recorded row (in order)."""

    run_id: str
    record: dict[str, Any]
    config: dict[str, Any]
    rows: list[ResultRow]

    @property
    def label(self) -> str:
        return f"{self.run_id} ({self.record.get('method')})"

    @property
    def valid(self) -> list[ResultRow]:
        return [r for r in self.rows if r.ok and r.val_accuracy is not None]


def load_run(store: ArtifactStore, run_id: str) -> RunView:
    """A run's view; a SearchsvcError naming it if the store has no such run."""
    check_id(run_id, "run id")
    if not layout.run_exists(store, run_id):
        raise SearchsvcError(f"compare: run '{run_id}' does not exist in {store.uri}")
    _, config = stored_config(store, run_id)
    return RunView(run_id, stored_record(store, run_id), config, stored_rows(store, run_id))


def check_comparable(views: list[RunView], allow_mixed: bool) -> None:
    """Runs compare when they share the data and the teacher: otherwise one line, unless `allow_mixed`."""
    if allow_mixed:
        return
    first = views[0]
    for view in views[1:]:
        for what, mine, theirs in (("dataset", _data(first), _data(view)),
                                   ("teacher", first.record.get("teacher_hash"), view.record.get("teacher_hash"))):
            if mine != theirs:
                raise SearchsvcError(f"compare: runs {first.run_id} and {view.run_id} have different {what}s "
                                     f"({_short(mine)} and {_short(theirs)}); --allow-mixed compares them anyway")


def _data(view: RunView) -> dict[str, Any]:
    """The dataset section without where the files are (root, download): what the data is."""
    return {k: v for k, v in (view.config.get("dataset") or {}).items() if k not in ("root", "download")}


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_budget(text: str) -> Budget:
    """`--budget macs=14000000,latency_ms=2,latency_batch=1` as a Budget; SearchsvcError naming the flag."""
    pairs = [item.partition("=") for item in text.split(",") if item.strip()]
    if not pairs or any(not sep or not key.strip() for key, sep, _ in pairs):
        raise SearchsvcError(f"--budget {text!r}: expected KEY=VALUE[,KEY=VALUE...], e.g. macs=14000000")
    raw = {key.strip(): _number(value.strip()) for key, _, value in pairs}
    try:
        return from_data(Budget, raw, path="--budget")
    except RecordError as err:
        raise SearchsvcError(err.problems[0]) from None


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # the record check names what is wrong with it


def budget_choices(views: list[RunView], extra: list[Budget]) -> list[BudgetChoice]:
    """No budget, then each run's own `search.budget`, then the `--budget`s: each once."""
    found: dict[str, Budget | None] = {"no budget": None}
    for view in views:
        stored = (view.config.get("search") or {}).get("budget")
        if isinstance(stored, dict):
            budget = from_data(Budget, stored, path=f"run {view.run_id}: search.budget")
            found.setdefault(budget.label(), budget)
    for budget in extra:
        found.setdefault(budget.label(), budget)
    return list(found.items())


def chosen(view: RunView, budget: Budget | None) -> ResultRow | None:
    """The model the run hands over under `budget`: most accurate on validation among its valid candidates
    within it (fewer parameters on a tie); None if none is."""
    return most_accurate(r for r in view.valid if budget is None or budget.within(r.get))


def build_compare(store: ArtifactStore, run_ids: list[str], budgets: list[Budget] = (),
                  allow_mixed: bool = False) -> str:
    """The HTML text of the comparison of `run_ids` (see the module docstring)."""
    views = [load_run(store, run_id) for run_id in dict.fromkeys(run_ids)]
    check_comparable(views, allow_mixed)
    teacher = teacher_point(store, views[0].record.get("teacher_hash"))
    parts = [f"<h1>searchsvc compare: {escape(', '.join(v.run_id for v in views))}</h1>",
             "<h2>Runs</h2>" + runs_table(views),
             "<h2>Pareto fronts (test accuracy vs size and speed; each chosen on validation; ★ the teacher)</h2>"
             "<div class='grid'>"]
    for metric, title, unit in FRONTS:
        if any(r.get(metric) is not None for v in views for r in v.valid):
            runs = [(v.label, [sized(r) for r in v.valid]) for v in views]
            axis = f"{title} ({unit}{', non-zero for sparse models' if metric in SPARSE else ''})"
            parts.append(img_html(overlay_png(runs, metric, axis, teacher),
                                  f"accuracy vs {title}: {'; '.join(v.label for v in views)}"))
    parts.append("</div><h2>The model each run hands over, per budget (chosen on validation accuracy)</h2>")
    parts.append(choices_table(views, budget_choices(views, list(budgets))))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>searchsvc compare</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


SPARSE = ("params", "macs")  # sizes a sparse (unthinned) model is compared by in their non-zero form


def sized(row: ResultRow) -> ResultRow:
    """The row with a sparse model's params and MACs as its non-zero counts (what a budget judges it by: a
    dense count would put a 90 %-sparse model beside the teacher)."""
    return row.with_columns(**{key: row.get(f"nonzero_{key}") for key in SPARSE
                               if row.get(f"nonzero_{key}") is not None})


def runs_table(views: list[RunView]) -> str:
    """Per run: method, status, teacher, evaluations, wall time and GPU-hours."""
    body = []
    for view in views:
        gpus = float((view.config.get("resources") or {}).get("gpus_per_eval") or 0)
        trained = sum(not r.cached for r in view.rows)
        body.append([view.run_id, view.record.get("method"), view.record.get("status"),
                     view.record.get("teacher_hash", "-"), f"{trained} trained, {len(view.rows) - trained} cached",
                     f"{len(view.valid)} of {len(view.rows)}", f"{(view.record.get('wall_s') or 0) / 60:.1f}",
                     f"{gpu_hours_of(view.rows, gpus):.3f}"])
    return table_html(["run", "method", "status", "teacher", "evaluations", "valid", "wall time (min)", "GPU-hours"],
                      body)


def choices_table(views: list[RunView], budgets: list[BudgetChoice]) -> str:
    """One row per (budget, run): the chosen model, both accuracies, its size and speed; and its int8 test
    accuracy and bytes when a run quantized its candidates (a `quantize:` section)."""
    int8 = any(r.get("int8_accuracy") is not None for v in views for r in v.valid)
    body = []
    for label, budget in budgets:
        for view in views:
            row = chosen(view, budget)
            row = None if row is None else sized(row)
            # a latency budget's own setting (ONNX Runtime, another batch size), else torch at batch 1
            latency = budget.columns("latency_ms")[0] if budget is not None and budget.latency_ms else "latency_ms"
            figures = ["-"] * (8 if int8 else 6) if row is None else [
                row.spec_hash, f"{row.val_accuracy:.2%}", f"{row.accuracy:.2%}", _count(row.params),
                _count(row.macs), "-" if row.get(latency) is None else f"{row.get(latency):.2f}"] + ([
                    "-" if row.get("int8_accuracy") is None else f"{row.get('int8_accuracy'):.2%}",
                    _count(row.get("int8_model_bytes"))] if int8 else [])
            body.append([label, view.label, *figures])
    titles = ["budget", "run", "model", "val accuracy", "test accuracy", "params (non-zero)", "MACs (non-zero)",
              "latency ms (batch 1; a latency budget: at its setting)"] + (["int8 test accuracy", "int8 bytes"]
                                                                          if int8 else [])
    scored_by = views[0].record.get("metric")  # a task's metric (runs of one teacher share it)
    return table_html([metric_title(title, scored_by) for title in titles], body)


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"
