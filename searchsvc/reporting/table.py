"""The results table: one row per evaluation, the same columns for every method (DESIGN §2), and how a
search ranks them (reward on validation data; test accuracy only reports). The search owns this; the
store only holds the Parquet file at `runs/<run_id>/results.parquet`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Union

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from storage import CorruptArtifactError, KeyNotFoundError, layout
from storage.base import ArtifactStore


@dataclass(frozen=True)
class ResultRow:
    """The fixed columns of a result row, in the table's order (a run adds its own columns after them:
    order, trial, sample, iteration, a method's extras). None: not measured (an invalid candidate)."""

    spec_hash: str
    method: str  # the registered method that proposed it (searchsvc.registry)
    run_id: str
    code_version: str  # git SHA or package version of the driver
    status: str  # ok | invalid
    accuracy: float  # top-1 on the test split, 0..1: reported, never used to choose
    val_accuracy: float | None  # top-1 on the validation split, 0..1: what every choice uses
    params: int | None  # parameters of the candidate (zeros included)
    macs: int | None  # multiply-accumulates for one image
    latency_ms: float | None  # batch-1 median on the worker's device, milliseconds
    compression: float | None  # x-factor: teacher params / candidate size (params, or non-zero params if sparse)
    reward: float  # validation-based; INVALID_REWARD for an invalid candidate
    wall_s: float  # seconds the evaluation took (build, train, measure)
    worker: str | None  # host:pid@node
    artifact: str | None  # URI of the kept model, or null
    device: str | None  # torch device of the evaluation
    latency_b256_ms: float | None  # batch-256 median on the worker's device, milliseconds
    model_bytes: int | None  # bytes of the saved state_dict
    cached: bool  # found in the store, not trained by this run
    error: str | None  # why the candidate is invalid
    removed: str  # JSON list of the blocks removed from the teacher
    widths: str  # JSON mapping of layer → width
    finetuned_from: str | None  # spec_hash of the candidate this one was fine-tuned from
    parent_accuracy: float | None  # that parent's test accuracy, 0..1
    within_budget: bool | None  # every limit of search.budget met (searchsvc.budget); null: no budget

    def to_data(self) -> dict[str, Any]:
        """The row as the dict the drivers keep and store (evals/<spec_hash>.json)."""
        return dataclasses.asdict(self)


ARROW_TYPES = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def arrow_schema(row_class: type) -> pa.Schema:
    """The Parquet schema of a row dataclass: one column per field, typed from its hint (Optional unwrapped).
    Every column is nullable all the same: rows recorded by an older version may lack a later column."""
    hints = typing.get_type_hints(row_class)
    columns = []
    for column in dataclasses.fields(row_class):
        hint = hints[column.name]
        if typing.get_origin(hint) in (Union, types.UnionType):  # `X | None`: a column of X
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        columns.append(pa.field(column.name, ARROW_TYPES[hint]))
    return pa.schema(columns)


RESULT_SCHEMA = arrow_schema(ResultRow)


def results_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows (dicts; extra keys kept as extra columns) → a table with the result schema first."""
    rows = list(rows)
    extra = sorted({k for row in rows for k in row} - set(RESULT_SCHEMA.names))
    columns = {name: [row.get(name) for row in rows] for name in RESULT_SCHEMA.names + extra}
    fields = list(RESULT_SCHEMA) + [pa.field(name, pa.array(columns[name]).type) for name in extra]
    return pa.table(columns, schema=pa.schema(fields))


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


def write_results(store: ArtifactStore, run_id: str, rows: Iterable[dict[str, Any]]) -> pa.Table:
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
    """A run's run.json (report, compare). A run stopped between writing its config and its record has none:
    a KeyNotFoundError that says so, in one line."""
    key = layout.run_record(run_id)
    if not store.exists(key):
        raise KeyNotFoundError(f"run '{run_id}' has no record yet ({store.uri_for(key)}): it stopped before it "
                               f"started; `searchsvc resume --store {store.uri} --run {run_id}` continues it")
    return store.get_mapping(key)


def stored_rows(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """Every evaluation row a run has recorded, in the order they were recorded (report, compare)."""
    rows = [read_row(store, key) for key in store.list(layout.evals_prefix(run_id))]
    return sorted(rows, key=lambda r: r.get("order") or 0)


def read_row(store: ArtifactStore, key: str) -> dict[str, Any]:
    """A stored evaluation row (runs/<id>/evals/<spec_hash>.json), checked for what every reader relies on."""
    row = store.get_mapping(key)
    if not isinstance(row.get("spec_hash"), str) or row.get("status") not in ("ok", "invalid"):
        raise CorruptArtifactError(f"{store.uri_for(key)} is corrupt: not a result row (spec_hash, status)")
    return row


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


def most_accurate(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The valid row with the highest validation accuracy (fewer parameters on a tie): the model a budget's
    choice hands over (`searchsvc compare`, the report). None if no row is valid."""
    valid = [r for r in rows if r.get("status") == "ok" and r.get("val_accuracy") is not None]
    return max(valid, key=lambda r: (r["val_accuracy"], -(r.get("params") or 0)), default=None)


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
