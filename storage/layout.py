"""Where everything lives in the store. Every key under runs/, candidates/ and teachers/ is built here,
and each id is checked here, once (`check_id`: no key escapes its prefix).

    runs/<run_id>/                  run.json, config.yaml, results.parquet, state/, tune/
    candidates/<spec_hash>/         spec.json, model.pt (kept models), metrics.json, manifest.json
    teachers/<teacher_hash>/        meta.json, model.pt, manifest.json
    teachers/<teacher_hash>/validation/, logits/    what is computed once per teacher, each with a manifest

A folder with a manifest.json is complete: the manifest is written last, once.
"""

from __future__ import annotations

from storage.base import MANIFEST, check_id

RUNS, CANDIDATES, TEACHERS = "runs/", "candidates/", "teachers/"


def run(run_id: str) -> str:
    """`runs/<run_id>`."""
    return f"{RUNS}{check_id(run_id, 'run id')}"


def run_file(run_id: str, name: str) -> str:
    """`runs/<run_id>/<name>` (name may hold folders: `state/n2n.json`)."""
    return f"{run(run_id)}/{name}"


def candidate(spec_hash: str) -> str:
    """`candidates/<spec_hash>`."""
    return f"{CANDIDATES}{check_id(spec_hash, 'spec hash')}"


def candidate_file(spec_hash: str, name: str) -> str:
    """`candidates/<spec_hash>/<name>`."""
    return f"{candidate(spec_hash)}/{name}"


def teacher(teacher_hash: str) -> str:
    """`teachers/<teacher_hash>`."""
    return f"{TEACHERS}{check_id(teacher_hash, 'teacher hash')}"


def teacher_file(teacher_hash: str, name: str) -> str:
    """`teachers/<teacher_hash>/<name>` (name may hold folders: `logits/meta.json`)."""
    return f"{teacher(teacher_hash)}/{name}"


def manifest(prefix: str) -> str:
    """The manifest of the folder `prefix`."""
    return f"{prefix}/{MANIFEST}"


def run_ids(keys: list[str]) -> list[str]:
    """The run ids among `keys` listed under runs/, sorted (ids start with a UTC timestamp: oldest first)."""
    return sorted({key.split("/")[1] for key in keys if key.startswith(RUNS) and key.count("/") >= 2})
