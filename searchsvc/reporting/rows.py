"""A result row: one evaluation of one candidate in one run, typed from the recorder to Parquet, the report and
`compare` (DESIGN §2). The fixed columns are fields; a run's own columns (order, trial, sample, iteration, a
method's extras, the run's own measurements) ride in `extra`, after them. Stored as one flat JSON object at
`runs/<run_id>/evals/<spec_hash>.json` and as one row of `results.parquet`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from core.names import is_int
from core.records import RecordError, from_data
from storage import CorruptArtifactError, InvalidKeyError, layout
from storage.base import RECORD_SHA256, ArtifactStore
from workers.measurement.metrics import stored_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ResultRow:
    """The fixed columns of a result row, in the table's order, then the run's own (`extra`). None: not
    measured (an invalid candidate), or a column an older version did not record."""

    spec_hash: str
    method: str  # the registered method that proposed it (searchsvc.registry)
    run_id: str
    code_version: str  # git SHA or package version of the driver
    status: Literal["ok", "invalid"]
    accuracy: float  # top-1 on the test split, 0..1: reported, never used to choose
    val_accuracy: float | None = None  # top-1 on the validation split, 0..1: what every choice uses
    params: int | None = None  # parameters of the candidate (zeros included)
    macs: int | None = None  # multiply-accumulates for one image
    latency_ms: float | None = None  # batch-1 median on the worker's device, milliseconds
    compression: float | None = None  # x-factor: teacher params / candidate size (params, or non-zero if sparse)
    reward: float  # validation-based; INVALID_REWARD for an invalid candidate
    wall_s: float  # seconds the evaluation took (build, train, measure)
    worker: str | None = None  # host:pid@node
    artifact: str | None = None  # URI of the kept model, or null
    device: str | None = None  # torch device of the evaluation
    latency_b256_ms: float | None = None  # batch-256 median on the worker's device, milliseconds
    model_bytes: int | None = None  # bytes of the saved state_dict
    cached: bool  # found in the store, not trained by this run
    error: str | None = None  # why the candidate is invalid
    removed: str  # JSON list of the blocks removed from the teacher
    widths: str  # JSON mapping of layer → width
    finetuned_from: str | None = None  # spec_hash of the candidate this one was fine-tuned from
    parent_accuracy: float | None = None  # that parent's test accuracy, 0..1
    within_budget: bool | None = None  # every limit of search.budget met (searchsvc.budget); null: no budget
    # The run's own columns by name (not a column itself): numbers, strings, bools or null.
    extra: Mapping[str, Any] = field(default_factory=dict, metadata={"column": False})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def order(self) -> int:
        """1, 2, ... in the order the run recorded its rows (0: not recorded by a run)."""
        value = self.extra.get("order")
        return value if is_int(value) else 0  # an edited, non-integer order sorts first, not a traceback

    def get(self, column: str, default: Any = None) -> Any:
        """Any column by name, fixed or the run's own (`default` where the row has none, or it is null)."""
        value = getattr(self, column) if column in COLUMNS else self.extra.get(column)
        return default if value is None else value

    def with_columns(self, **columns: Any) -> ResultRow:
        """This row with `columns` set: fixed ones replaced, the others added to (or replaced in) `extra`."""
        fixed = {k: v for k, v in columns.items() if k in COLUMNS}
        added = {k: v for k, v in columns.items() if k not in COLUMNS}
        return dataclasses.replace(self, **fixed, extra={**self.extra, **added})

    def to_data(self) -> dict[str, Any]:
        """The row as one flat mapping: fixed columns, then the run's own (its stored JSON; a Parquet row)."""
        return {**{name: getattr(self, name) for name in COLUMNS}, **self.extra}

    @classmethod
    def from_data(cls, data: Any, source: str = "a result row") -> ResultRow:
        """A row read back (an evals/<hash>.json, a row of results.parquet), every fixed column checked for its
        type (finite numbers); CorruptArtifactError naming `source` and the first problem otherwise."""
        if not isinstance(data, Mapping):
            raise CorruptArtifactError(f"{source} is corrupt: not a result row (a mapping was expected)")
        fixed = {k: v for k, v in data.items() if k in COLUMNS and v is not None or k in REQUIRED}
        try:
            row = from_data(cls, fixed, source=source)
        except RecordError as err:
            raise CorruptArtifactError(f"{source} is corrupt: not a result row ({err.problems[0]})") from None
        return dataclasses.replace(row, extra={k: v for k, v in data.items() if k not in COLUMNS})


COLUMNS = tuple(f.name for f in dataclasses.fields(ResultRow) if f.metadata.get("column", True))
REQUIRED = tuple(f.name for f in dataclasses.fields(ResultRow)
                 if f.metadata.get("column", True) and f.default is dataclasses.MISSING)


# What an ok row took from its candidate's metrics.json as it was recorded: they must still agree.
MEASURED = ("status", "accuracy", "val_accuracy", "params", "macs", "latency_ms", "latency_b256_ms", "model_bytes")


def read_row(store: ArtifactStore, key: str) -> ResultRow:
    """A stored evaluation row (runs/<id>/evals/<spec_hash>.json), verified (`verified_row`)."""
    return verified_row(store, key)[0]


def verified_row(store: ArtifactStore, key: str) -> tuple[ResultRow, bool]:
    """(row, sealed): a stored evaluation row, every byte checked before it is used. Its RECORD_SHA256 (rows
    written before rows carried one: unsealed), its key (the run and candidate it holds), every fixed column's
    type, and for an ok row, its measurements against its candidate's manifest-checked metrics.json where the
    store holds the candidate. CorruptArtifactError naming the file otherwise."""
    data, source = store.get_mapping(key), store.uri_for(key)
    is_sealed = data.pop(RECORD_SHA256, None) is not None
    row = ResultRow.from_data(data, source=source)
    try:
        in_place = key == layout.eval_row(row.run_id, row.spec_hash)
    except InvalidKeyError:  # an id no key could hold
        in_place = False
    if not in_place:
        raise CorruptArtifactError(f"{source} is corrupt: it holds the row of {row.spec_hash} in run {row.run_id}")
    metrics = stored_metrics(store, row.spec_hash) if row.ok else None  # None: the candidate is not stored
    differs = [column for column in MEASURED if metrics is not None and getattr(row, column) != metrics.get(column)]
    if differs:
        raise CorruptArtifactError(
            f"{source} is corrupt: its {differs[0]} {getattr(row, differs[0])!r} is not the "
            f"{metrics.get(differs[0])!r} of {store.uri_for(layout.candidate_metrics(row.spec_hash))}")
    return row, is_sealed


def stored_rows(store: ArtifactStore, run_id: str) -> list[ResultRow]:
    """Every evaluation row a run has recorded, verified (`verified_row`), in the order they were recorded
    (report, compare, resume). Rows an older version wrote without a checksum are read as they are (a warning
    counts them): an ok one still agrees with its candidate's metrics.json, or is refused."""
    checked = [verified_row(store, key) for key in store.list(layout.evals_prefix(run_id))]
    unsealed = sum(not is_sealed for _, is_sealed in checked)
    if unsealed:
        log.warning("run %s: %d of its %d evaluation rows carry no %s (written before rows did); their "
                    "measurements are checked against their candidates' %s, their rewards are not",
                    run_id, unsealed, len(checked), RECORD_SHA256, layout.METRICS)
    return sorted((row for row, _ in checked), key=lambda r: r.order)


def most_accurate(rows: Iterable[ResultRow]) -> ResultRow | None:
    """The valid row with the highest validation accuracy (fewer parameters on a tie): the model a budget's
    choice hands over (`searchsvc compare`, the report). None if no row is valid."""
    valid = [r for r in rows if r.ok and r.val_accuracy is not None]
    return max(valid, key=lambda r: (r.val_accuracy, -(r.params or 0)), default=None)


def pareto_front(rows: Iterable[ResultRow], size: str = "params", accuracy: str = "val_accuracy") -> set[str]:
    """Spec hashes of the valid rows no other valid row beats: fewer or equal `size` and higher `accuracy`
    (validation by default: the front is a choice), or strictly fewer `size` at equal accuracy."""
    valid = sorted((r for r in rows if r.ok and r.get(size) is not None and r.get(accuracy) is not None),
                   key=lambda r: (r.get(size), -r.get(accuracy)))
    front, best = set(), float("-inf")
    for row in valid:  # by size ascending: a row is on the front if it beats every smaller one
        if row.get(accuracy) > best:
            front.add(row.spec_hash)
            best = row.get(accuracy)
    return front
