"""Where everything lives: one `ArtifactStore` interface, a local-folder and an S3 backend.

The S3 backend (boto3) is imported only when an s3:// store is opened or `S3Store` is named: a worker
with a local store runs without boto3 (the GPU check's bare machine has none).

    store = open_store("./searchsvc-store")            # or file:///abs/dir, s3://bucket/prefix
    store.put_json("runs/r1/evals/abc.json", {...}, write_once=True)
"""

from __future__ import annotations

from urllib.parse import urlsplit

from storage.base import ArtifactStore, check_id, check_key, sha256_bytes, sha256_file
from storage.errors import (
    BucketNotFoundError,
    CorruptArtifactError,
    InvalidKeyError,
    KeyNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
    UnsavedResult,
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
    "KeyNotFoundError", "LocalStore", "S3Store", "StoreAccessError", "StoreError",
    "StoreUnreachableError", "UnsavedResult", "WriteConflictError", "check_id", "check_key", "open_store", "sha256_bytes",
    "sha256_file",
]


def open_store(
    uri: str | None = None, endpoint: str | None = None, create: bool = True, max_attempts: int = 4
) -> ArtifactStore:
    """Open the store at `uri`: a folder path, `file:///abs/dir` or `s3://bucket/prefix`.

    `create=False` makes a missing local folder an error (for read-only commands such as `results`).
    S3 stores check the endpoint and bucket at once so a typo fails before any work is done.
    """
    uri = uri or DEFAULT_STORE
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StoreError(f"store URI {uri!r} has no bucket: expected s3://bucket/prefix")
        from storage.s3 import S3Store

        return S3Store(parts.netloc, parts.path, endpoint=endpoint, max_attempts=max_attempts)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        return LocalStore(parts.path, create=create)
    if parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise StoreError(f"store URI {uri!r}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)")
    return LocalStore(uri, create=create)
