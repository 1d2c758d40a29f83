"""A candidate's metrics: what its worker measured, as one typed record (`candidates/<hash>/metrics.json`).

The stored JSON is flat: the fields below, and beside them whatever a method adds (`extra`: sparsity,
nonzero_params, filters, rigl_updates, thinned, ...). `CandidateMetrics.from_data` is the one checked
reader of a stored metrics.json, and `stored_metrics` the one way to read it from the store.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from core import records
from core.records import RecordError
from storage import ArtifactStore, CorruptArtifactError, layout

UNIT = {"min": 0, "max": 1}  # an accuracy: top-1, a fraction
COUNT = {"min": 0}  # counts, bytes and durations are never negative


@dataclass(frozen=True)
class CandidateMetrics:
    """One evaluation's result, status ok or invalid. None: not measured for this candidate (an invalid one
    has no params; a model not kept has no latency, bytes or artifact)."""

    spec_hash: str
    status: Literal["ok", "invalid"]
    accuracy: float = field(default=0.0, metadata=UNIT)  # top-1 on the test split: reported, never used to choose
    val_accuracy: float | None = field(default=None, metadata=UNIT)  # top-1 on the validation split: what decides
    params: int | None = field(default=None, metadata=COUNT)  # parameters of the built model (zeros included)
    macs: int | None = field(default=None, metadata=COUNT)  # multiply-accumulates for one image
    latency_ms: float | None = field(default=None, metadata=COUNT)  # batch-1 forward, median, milliseconds
    latency_b256_ms: float | None = field(default=None, metadata=COUNT)  # batch-256 forward, median, milliseconds
    model_bytes: int | None = field(default=None, metadata=COUNT)  # bytes of the saved state_dict (model.pt)
    wall_s: float = field(default=0.0, metadata=COUNT)  # seconds to build, train and measure (not to store)
    train_seconds: float | None = field(default=None, metadata=COUNT)  # seconds from the start to trained
    started_unix_s: float | None = None  # when the evaluation began, seconds since the epoch
    worker: str | None = None  # host:pid@node of the worker that evaluated it
    device: str | None = None  # the torch device it was trained and measured on ("cpu", "cuda")
    artifact: str | None = None  # URI of the kept model.pt, or None when no model is kept
    error: str | None = None  # why the candidate is invalid
    arch: dict[str, Any] | None = None  # the built architecture (`workers.models.zoo.arch_from_data` rebuilds it)
    history: tuple[dict[str, Any], ...] | None = None  # one record per training epoch (loss, accuracies, ...)
    bn_recalibration_batches: int | None = field(default=None, metadata=COUNT)  # batches that re-estimated BN
    extra: dict[str, Any] = field(default_factory=dict)  # what the method adds, stored beside the fields

    def __post_init__(self) -> None:
        clash = sorted(set(self.extra) & set(FIELDS))
        if clash:  # stored flat: an extra named like a field would be read back as the field
            raise ValueError(f"extra: {', '.join(clash)} are fields of CandidateMetrics, not extras")

    @classmethod
    def invalid(cls, spec_hash: str, reason: str, wall_s: float = 0.0, worker: str | None = None) -> CandidateMetrics:
        """The result of a candidate that could not be built, trained or evaluated."""
        return cls(spec_hash, "invalid", error=reason, wall_s=wall_s, worker=worker)

    @classmethod
    def from_data(cls, data: Any, source: str = "") -> CandidateMetrics:
        """Checked from a stored metrics.json's data: keys that are not fields become extras; a wrong type,
        a NaN, a missing spec_hash or status raise one RecordError listing every problem (naming `source`)."""
        if isinstance(data, dict):
            data = {**{k: v for k, v in data.items() if k in FIELDS},
                    "extra": {k: v for k, v in data.items() if k not in FIELDS}}
        return records.from_data(cls, data, source=source)

    def to_data(self) -> dict[str, Any]:
        """The flat stored form: extras beside the fields; a field that is None is left out, except those
        every result has stored since the first version (an invalid one names its worker and artifact)."""
        data = dict(self.extra)
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None or name in ALWAYS_STORED:
                data[name] = records.to_data(value)
        return data

    def get(self, name: str, default: Any = None) -> Any:
        """A field or an extra by name (a recorder sizes by "params" or "nonzero_params"); `default` when
        the candidate has no such value."""
        value = getattr(self, name) if name in FIELDS else self.extra.get(name)
        return default if value is None else value


FIELDS = tuple(f.name for f in dataclasses.fields(CandidateMetrics) if f.name != "extra")
ALWAYS_STORED = frozenset({"spec_hash", "status", "accuracy", "wall_s", "worker", "artifact"})


def stored_metrics(store: ArtifactStore, spec_hash: str) -> CandidateMetrics | None:
    """The metrics of a complete stored evaluation, or None (the cache lookup). Checked against the
    candidate's manifest like every stored byte, then as a record: an edited or undecodable metrics.json is
    a CorruptArtifactError naming it, never a result (write-once: it cannot be recomputed in place, so the
    run stops on it)."""
    if not store.exists(layout.manifest(layout.candidate(spec_hash))):
        return None
    return verified_metrics(store, spec_hash)


def verified_metrics(store: ArtifactStore, spec_hash: str) -> CandidateMetrics:
    """The metrics.json of a candidate known to be complete, checked (see `stored_metrics`)."""
    source = store.uri_for(layout.candidate_metrics(spec_hash))
    raw = store.get_verified(layout.candidate(spec_hash), layout.METRICS)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptArtifactError(f"{source} is corrupt: not JSON ({err})") from None
    try:
        return CandidateMetrics.from_data(data, source=source)
    except RecordError as err:
        raise CorruptArtifactError(f"{source} is corrupt: {'; '.join(err.problems)}") from None
