"""Results that could not reach the store, kept on the local disk until they can.

When the store stays unreachable past its retry window, the driver writes the result it was
recording here instead of dropping it, and stops the run with a message naming this folder.
`searchsvc resume` uploads what is kept (write-once, so nothing stored is replaced) before it goes on.

    <store.spool_root: StoreOptions.spool_root, default ~/.cache/searchsvc/pending>/<sha256(store uri)[:16]>/<key>
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from storage.base import ArtifactStore, check_key

log = logging.getLogger(__name__)


def spool_dir(store: ArtifactStore) -> Path:
    """The local folder that holds `store`'s pending writes (one folder per store URI)."""
    return store.spool_root / hashlib.sha256(store.uri.encode()).hexdigest()[:16]


def keep_bytes(store: ArtifactStore, key: str, data: bytes) -> Path:
    """Write `data` under the store's spool folder at `key`; return the file's path."""
    path = spool_dir(store) / check_key(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(data)
    partial.replace(path)  # atomic: a crash leaves the old file or the new one, never half of one
    return path


def pending(store: ArtifactStore, prefix: str = "") -> list[str]:
    """Store keys kept locally for `store` (under `prefix`), sorted."""
    root = spool_dir(store)
    if not root.is_dir():
        return []
    keys = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".partial")
    return sorted(k for k in keys if k.startswith(prefix))


def upload(store: ArtifactStore, prefix: str = "") -> list[str]:
    """Put every kept file under `prefix` into the store (write-once), deleting each once stored; return
    the keys. Manifests are never kept here: the caller writes them after the files (`job.upload_kept`)."""
    root = spool_dir(store)
    keys = pending(store, prefix)
    for key in keys:
        path = root / key
        store.put_bytes(key, path.read_bytes(), write_once=True)
        path.unlink()
    if keys:
        log.info("uploaded %d file(s) kept in %s while the store was unreachable", len(keys), root)
    return keys
