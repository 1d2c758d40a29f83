"""The results table: one row per evaluation, the same columns for every method (DESIGN §2), and how a
search ranks them (reward on validation data; test accuracy only reports). The search owns this; the
store only holds the Parquet file at `runs/<run_id>/results.parquet`."""

from __future__ import annotations

from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from storage import KeyNotFoundError, layout
from storage.base import ArtifactStore

RESULT_SCHEMA = pa.schema([
    ("spec_hash", pa.string()),
    ("method", pa.string()),
    ("run_id", pa.string()),
    ("code_version", pa.string()),
    ("status", pa.string()),  # ok | invalid
    ("accuracy", pa.float64()),  # top-1 on the test split, 0..1: reported, never used to choose
    ("val_accuracy", pa.float64()),  # top-1 on the validation split, 0..1: what every choice uses
    ("params", pa.int64()),
    ("macs", pa.int64()),  # multiply-accumulates for one image
    ("latency_ms", pa.float64()),  # batch-1 median on the worker's device
    ("compression", pa.float64()),  # x-factor: teacher params / candidate params
    ("reward", pa.float64()),
    ("wall_s", pa.float64()),  # seconds the evaluation took
    ("worker", pa.string()),
    ("artifact", pa.string()),  # URI of the kept model, or null
])


def results_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts; extra keys kept as extra columns) → a table with the result schema first."""
    rows = list(rows)
    extra = sorted({k for row in rows for k in row} - set(RESULT_SCHEMA.names))
    columns = {name: [row.get(name) for row in rows] for name in RESULT_SCHEMA.names + extra}
    fields = list(RESULT_SCHEMA) + [pa.field(name, pa.array(columns[name]).type) for name in extra]
    return pa.table(columns, schema=pa.schema(fields))


def rank(table: pa.Table) -> pa.Table:
    """Best first: valid results by reward, then validation accuracy, then fewest params (test accuracy
    plays no part: it only reports)."""
    if table.num_rows == 0:
        return table
    invalid = pc.not_equal(table["status"], "ok").cast(pa.int8())
    keyed = table.append_column("_invalid", invalid)
    order = [("_invalid", "ascending"), ("reward", "descending"), ("val_accuracy", "descending"),
             ("params", "ascending")]
    return keyed.sort_by(order).drop_columns(["_invalid"])


def write_results(store: ArtifactStore, run_id: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
    """(Re)write `runs/<id>/results.parquet` atomically from all rows so far; return the ranked table."""
    table = rank(results_table(rows))
    store.put_table(f"{layout.run(run_id)}/results.parquet", table)
    return table


def read_results(store: ArtifactStore, run_id: str | None = None) -> pa.Table:
    """The ranked results of `run_id` (latest run by default); an empty table if none were written."""
    run_id = run_id or layout.latest_run(store)
    prefix = layout.run(run_id)
    if not store.exists(f"{prefix}/config.yaml"):
        raise KeyNotFoundError(f"run '{run_id}' does not exist in {store.uri}")
    key = f"{prefix}/results.parquet"
    if not store.exists(key):
        return RESULT_SCHEMA.empty_table()
    return rank(store.get_table(key))


def pareto_front(rows: Iterable[dict[str, Any]], size: str = "params", accuracy: str = "val_accuracy") -> set[str]:
    """Spec hashes of the valid rows no other valid row beats: fewer or equal `size` and higher `accuracy`
    (validation by default: the front is a choice), or strictly fewer `size` at equal accuracy."""
    valid = sorted((r for r in rows if r.get("status") == "ok" and r.get(size) is not None
                    and r.get(accuracy) is not None), key=lambda r: (r[size], -r[accuracy]))
    front, best = set(), float("-inf")
    for row in valid:  # by size ascending: a row is on the front if it beats every smaller one
        if row[accuracy] > best:
            front.add(row["spec_hash"])
            best = row[accuracy]
    return front
