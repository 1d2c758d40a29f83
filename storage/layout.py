"""Where everything lives in the store. Every key under runs/, candidates/ and teachers/ is built here,
and each id is checked here, once (`check_id`: no key escapes its prefix).

    runs/<run_id>/                  run.json, config.yaml, results.parquet, state/, tune/
    candidates/<spec_hash>/         spec.json, model.pt (kept models), metrics.json, manifest.json
    teachers/<teacher_hash>/        meta.json, model.pt, manifest.json
    teachers/<teacher_hash>/validation/, logits/    what is computed once per teacher, each with a manifest

A folder with a manifest.json is complete: the manifest is written last, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.base import MANIFEST, ArtifactStore, check_id
from storage.errors import StoreError

RUNS, CANDIDATES, TEACHERS = "runs/", "candidates/", "teachers/"


@dataclass(frozen=True)
class Folder:
    """One kind of folder: `folder(id)` is its key (the id checked), `folder.file(id, name)` a file in it."""

    root: str  # "runs/", ...
    what: str  # what the id is, for the error message

    def __call__(self, value: str) -> str:
        return f"{self.root}{check_id(value, self.what)}"

    def file(self, value: str, name: str) -> str:
        """`<root><id>/<name>` (name may hold folders: `state/n2n.json`, `logits/meta.json`)."""
        return f"{self(value)}/{name}"


run = Folder(RUNS, "run id")  # runs/<run_id>
candidate = Folder(CANDIDATES, "spec hash")  # candidates/<spec_hash>
teacher = Folder(TEACHERS, "teacher hash")  # teachers/<teacher_hash>
run_file, candidate_file, teacher_file = run.file, candidate.file, teacher.file


def manifest(prefix: str) -> str:
    """The manifest of the folder `prefix`."""
    return f"{prefix}/{MANIFEST}"


def run_ids(keys: list[str]) -> list[str]:
    """The run ids among `keys` listed under runs/, sorted (ids start with a UTC timestamp: oldest first)."""
    return sorted({key.split("/")[1] for key in keys if key.startswith(RUNS) and key.count("/") >= 2})


def list_runs(store: ArtifactStore) -> list[str]:
    """Run ids in the store, oldest first (ids start with a UTC timestamp)."""
    return run_ids(store.list(RUNS))


def latest_run(store: ArtifactStore) -> str:
    """The newest run id; StoreError if the store holds none."""
    runs = list_runs(store)
    if not runs:
        raise StoreError(f"{store.uri} holds no runs yet: start one with `searchsvc run CONFIG`")
    return runs[-1]
