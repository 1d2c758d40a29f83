"""A candidate is data: a frozen, hashable `CandidateSpec` whose `spec_hash` keys everything downstream."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from core.records import canonical_json, from_data
from storage import layout
from workers.data.datasets import DatasetConfig
from workers.training.train import TrainConfig


def short_hash(text: str) -> str:
    """First 16 hex digits of sha256: the identity format of specs and teachers."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CandidateSpec:
    """Everything needed to rebuild, train and measure one candidate network on any worker.

    The transformation is relative to the teacher `arch`: blocks removed, per-layer output widths
    (layer name → channels), an optional sparsity-mask artifact and pruning-schedule reference.
    """

    arch: str  # what it is cut from: a zoo name ("resnet20") or the user's constructor ("torchvision:resnet18")
    teacher: str  # teacher_hash the candidate inherits its weights from
    dataset: DatasetConfig
    train: TrainConfig
    method: str = "grid"
    removed: tuple[str, ...] = ()  # block names, e.g. ("layer2.1",)
    widths: tuple[tuple[str, int], ...] = ()  # (layer name, output channels), sorted by name
    init: str | None = None  # spec hash of a stored candidate to start from (fine-tuning); None: the teacher
    masks: str | None = None  # store key of a sparsity-mask artifact (DESIGN §2). No method sets it yet (sparse
    # models keep their zeros in model.pt); kept because dropping it would change every stored spec hash
    schedule: str | None = None  # hash of a pruning schedule (agp / rigl)
    seed: int = 0
    params: tuple[tuple[str, bool | int | float | str], ...] = ()  # method hyper-parameters, sorted by key
    kernels: tuple[tuple[str, int], ...] = field(default=(), metadata={  # (conv name, odd kernel size), sorted
        "omit_default": True})

    def __post_init__(self) -> None:
        # Where the files are is not what the candidate is: the same data from another folder (or
        # another machine) must give the same hash. Workers get the real dataset config from the pool.
        object.__setattr__(self, "dataset", self.dataset.identity())
        # Canonical order, so the same transformation always has the same hash.
        object.__setattr__(self, "removed", tuple(sorted(self.removed)))
        object.__setattr__(self, "widths", tuple(sorted((str(k), v) for k, v in self.widths)))
        object.__setattr__(self, "params", tuple(sorted(self.params)))
        object.__setattr__(self, "kernels", tuple(sorted((str(k), v) for k, v in self.kernels)))

    def canonical_json(self) -> str:
        """Sorted keys, no whitespace: what the hash is taken of."""
        return canonical_json(self)

    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON, first 16 hex digits."""
        return short_hash(self.canonical_json())

    @classmethod
    def from_json(cls, text: str) -> "CandidateSpec":
        """Rebuild a spec from its JSON (as stored in `candidates/<hash>/spec.json`)."""
        return from_data(cls, json.loads(text), source=layout.SPEC)


@dataclass(frozen=True)
class Builder:
    """A method's own builder of its candidates, as its registry entry names it (searchsvc.registry): a worker
    builds every candidate of `method` with `function(parent, spec, ctx) -> Built` (workers.evaluation.evaluate)."""

    method: str
    function: str  # "module:function", imported on the worker when first used


__all__ = ["Builder", "CandidateSpec", "short_hash"]
