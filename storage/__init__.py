"""Where everything lives: one `ArtifactStore` interface, a local-folder and an S3 backend.

The S3 backend (boto3) is imported only when an s3:// store is opened or `S3Store` is named: a worker
with a local store runs without boto3 (the GPU check's bare machine has none).

    store = open_store("./searchsvc-store")            # or file:///abs/dir, s3://bucket/prefix
    store.put_json("runs/r1/evals/abc.json", {...}, write_once=True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from storage.base import DEFAULT_SPOOL_ROOT, ArtifactStore, check_id, check_key, sha256_bytes, sha256_file
from storage.errors import (
    BucketNotFoundError,
    CorruptArtifactError,
    InvalidKeyError,
    KeyNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
    StoreWriteError,
    WriteConflictError,
)
from storage.local import LocalStore

DEFAULT_STORE = "./searchsvc-store"


def __getattr__(name: str):  # PEP 562: `from storage import S3Store` imports boto3 only then
    if name == "S3Store":
        from storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module 'storage' has no attribute {name!r}")

__all__ = [
    "DEFAULT_STORE", "ArtifactStore", "BucketNotFoundError", "CorruptArtifactError", "InvalidKeyError",
    "KeyNotFoundError", "LocalStore", "S3Store", "StoreAccessError", "StoreError", "StoreOptions",
    "StoreUnreachableError", "StoreWriteError", "WriteConflictError", "check_id", "check_key", "local_folder",
    "open_store",
    "sha256_bytes", "sha256_file",
]


@dataclass(frozen=True)
class StoreOptions:
    """How a store rides out trouble; the entry points (CLI, `searchsvc.run`) read them from the environment
    once (`from_env`) and pass them in."""

    retry_window_s: float = 120.0  # seconds a reached S3 store may stay unreachable before a call fails
    spool_root: Path = DEFAULT_SPOOL_ROOT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "StoreOptions":
        """SEARCHSVC_STORE_RETRY_S (seconds) and SEARCHSVC_SPOOL_DIR, where set; defaults otherwise."""
        options = cls()
        raw = environ.get("SEARCHSVC_STORE_RETRY_S")
        if raw is not None:
            try:
                retry = float(raw)
            except ValueError:
                raise StoreError(f"SEARCHSVC_STORE_RETRY_S: expected seconds, got {raw!r}") from None
            if not retry >= 0:
                raise StoreError(f"SEARCHSVC_STORE_RETRY_S: must be >= 0, got {raw!r}")
            options = cls(retry, options.spool_root)
        if environ.get("SEARCHSVC_SPOOL_DIR"):
            options = cls(options.retry_window_s, Path(environ["SEARCHSVC_SPOOL_DIR"]))
        return options


def open_store(
    uri: str | None = None, endpoint: str | None = None, create: bool = True, max_attempts: int = 4,
    options: StoreOptions | None = None,
) -> ArtifactStore:
    """Open the store at `uri`: a folder path, `file:///abs/dir` or `s3://bucket/prefix`.

    `create=False` makes a missing local folder an error (for read-only commands such as `results`).
    S3 stores check the endpoint and bucket at once so a typo fails before any work is done.
    `options`: retry window and spool folder (the defaults unless given: the environment is the caller's).
    """
    uri = uri or DEFAULT_STORE
    options = options or StoreOptions()
    folder = local_folder(uri)
    if folder is not None:
        store: ArtifactStore = LocalStore(folder, create=create)
    else:
        parts = urlsplit(uri)
        if not parts.netloc:
            raise StoreError(f"store URI {uri!r} has no bucket: expected s3://bucket/prefix")
        from storage.s3 import S3Store

        store = S3Store(parts.netloc, parts.path, endpoint=endpoint, max_attempts=max_attempts,
                        retry_window_s=options.retry_window_s)
    store.spool_root = options.spool_root
    return store


def local_folder(uri: str) -> str | None:
    """The folder of a local store URI (a path or file:///abs/dir) as given, None for s3://bucket/prefix;
    StoreError for a URI that is neither."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        return parts.path
    if parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise StoreError(f"store URI {uri!r}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)")
    return uri
