"""The results table: one row per evaluation, the same columns for every method (DESIGN §2), and how a
search ranks them (reward on validation data; test accuracy only reports). The search owns this; the
store only holds the Parquet file at `runs/<run_id>/results.parquet`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import types
import typing
from typing import Any, Iterable, Literal, Union

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from searchsvc.reporting.rows import ResultRow, read_row
from storage import CorruptArtifactError, KeyNotFoundError, layout
from storage.base import RECORD_SHA256, ArtifactStore

log = logging.getLogger(__name__)

ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def arrow_schema(row_class: type) -> pa.Schema:
    """The Parquet schema of a row dataclass: one column per column field, typed from its hint (Optional
    unwrapped; a Literal by its values' type). Every column is nullable all the same: rows recorded by an older
    version may lack a later column."""
    hints = typing.get_type_hints(row_class)
    columns = []
    for column in dataclasses.fields(row_class):
        if not column.metadata.get("column", True):
            continue
        hint = hints[column.name]
        if typing.get_origin(hint) in (Union, types.UnionType):  # `X | None`: a column of X
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is Literal:  # `Literal["ok", "invalid"]`: a column of str
            hint = type(typing.get_args(hint)[0])
        columns.append(pa.field(column.name, ARROW_TYPES[hint]))
    return pa.schema(columns)


RESULT_SCHEMA = arrow_schema(ResultRow)


def results_table(rows: Iterable[ResultRow]) -> pa.Table:
    """Rows → a table with the result schema first, then the runs' own columns (sorted by name)."""
    rows = [row.to_data() for row in rows]
    extra = sorted({k for row in rows for k in row} - set(RESULT_SCHEMA.names))
    columns = {name: [row.get(name) for row in rows] for name in RESULT_SCHEMA.names + extra}
    fields = list(RESULT_SCHEMA) + [pa.field(name, pa.array(columns[name]).type) for name in extra]
    return pa.table(columns, schema=pa.schema(fields))


def table_rows(table: pa.Table, source: str = "a results table") -> list[ResultRow]:
    """A table's rows, in its order (NaN → null: a row holds finite numbers only)."""
    return [ResultRow.from_data({k: _finite_or_null(v) for k, v in row.items()}, source) for row in table.to_pylist()]


def _finite_or_null(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def rank(table: pa.Table) -> pa.Table:
    """Best first: valid results, within budget before over it (a run with `search.budget`), then by reward,
    validation accuracy, fewest params (test accuracy plays no part: it only reports)."""
    if table.num_rows == 0:
        return table
    keys = {"_invalid": pc.not_equal(table["status"], "ok").cast(pa.int8())}
    if "within_budget" in table.column_names and table["within_budget"].null_count < table.num_rows:
        keys["_over"] = pc.invert(pc.fill_null(table["within_budget"], False)).cast(pa.int8())
    keyed = table
    for name, column in keys.items():
        keyed = keyed.append_column(name, column)
    order = [(name, "ascending") for name in keys] + [("reward", "descending"), ("val_accuracy", "descending"),
                                                      ("params", "ascending")]
    return keyed.sort_by(order).drop_columns(list(keys))


# The sha256 of a table's rows, kept in its own Parquet metadata: one object, rewritten atomically, so a
# crash can never leave table and checksum out of step; an edited value no longer matches it.
ROWS_SHA256 = b"searchsvc.rows_sha256"
# Columns a results table cannot do without (a Parquet file of another schema is not a results table).
REQUIRED = ("spec_hash", "status", "accuracy", "val_accuracy", "params", "reward")


def rows_sha256(table: pa.Table) -> str:
    """sha256 of the table's rows as canonical JSON (values only: independent of the file's encoding)."""
    text = json.dumps(table.to_pylist(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def write_results(store: ArtifactStore, run_id: str, rows: Iterable[ResultRow]) -> pa.Table:
    """(Re)write `runs/<id>/results.parquet` atomically from all rows so far; return the ranked table."""
    table = rank(results_table(rows))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), ROWS_SHA256: rows_sha256(table).encode()})
    store.put_table(layout.run_results(run_id), table)
    return table


def read_results(store: ArtifactStore, run_id: str | None = None) -> pa.Table:
    """The ranked results of `run_id` (latest run by default); an empty table if none were written."""
    run_id = run_id or layout.latest_run(store)
    if not layout.run_exists(store, run_id):
        raise KeyNotFoundError(f"run '{run_id}' does not exist in {store.uri}")
    key = layout.run_results(run_id)
    if not store.exists(key):
        return RESULT_SCHEMA.empty_table()
    table = store.get_table(key)
    check_results(store, run_id, table)
    return rank(table)


def stored_config(store: ArtifactStore, run_id: str) -> tuple[str, dict[str, Any]]:
    """A run's stored config.yaml: its text and its top-level mapping (report, resume); CorruptArtifactError
    naming it if it is not UTF-8 YAML holding a mapping."""
    key = layout.run_config(run_id)
    try:
        text = store.get_bytes(key).decode("utf-8")
        data = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise CorruptArtifactError(f"{store.uri_for(key)} is corrupt: not a YAML config "
                                   f"({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CorruptArtifactError(f"{store.uri_for(key)} is corrupt: a mapping of config keys was expected")
    return text, data


def stored_record(store: ArtifactStore, run_id: str) -> dict[str, Any]:
    """A run's run.json (report, compare), checked against the checksum it carries (CorruptArtifactError naming it
    if edited; one an older version wrote without a checksum is read as it is, with a warning). A run stopped
    between writing its config and its record has none: a KeyNotFoundError that says so, in one line."""
    key = layout.run_record(run_id)
    if not store.exists(key):
        raise KeyNotFoundError(f"run '{run_id}' has no record yet ({store.uri_for(key)}): it stopped before it "
                               f"started; `searchsvc resume --store {store.uri} --run {run_id}` continues it")
    record = store.get_mapping(key)
    if RECORD_SHA256 not in record:
        log.warning("%s carries no %s (written before run records did): read unverified", store.uri_for(key),
                    RECORD_SHA256)
    return {k: v for k, v in record.items() if k != RECORD_SHA256}


def check_results(store: ArtifactStore, run_id: str, table: pa.Table) -> None:
    """CorruptArtifactError naming the file unless `table` is the run's results as written: its columns, and
    its rows against the checksum in its metadata (tables written before the checksum: against the run's
    write-once evaluations, evals/<spec_hash>.json)."""
    source = store.uri_for(layout.run_results(run_id))
    missing = [column for column in REQUIRED if column not in table.column_names]
    if missing:
        raise CorruptArtifactError(f"{source} is not a results table: it has no column {missing[0]!r}")
    recorded = (table.schema.metadata or {}).get(ROWS_SHA256)
    if recorded is not None:
        if recorded.decode() != rows_sha256(table):
            raise CorruptArtifactError(f"{source} is corrupt: its rows do not match the checksum written with them "
                                       f"(edited after the run wrote it?)")
        return
    for row in table.select(list(REQUIRED)).to_pylist():
        key = layout.eval_row(run_id, row["spec_hash"])
        stored = read_row(store, key) if store.exists(key) else None
        if stored is None or any(stored.get(c) != row[c] for c in REQUIRED):
            raise CorruptArtifactError(f"{source} is corrupt: the row of {row['spec_hash']} differs from "
                                       f"{store.uri_for(key)}")
