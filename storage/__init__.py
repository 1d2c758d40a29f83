"""Where everything lives: one `ArtifactStore` interface, a local-folder and an S3 backend.

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
    SearchsvcError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
    UnsavedResult,
    WriteConflictError,
)
from storage.local import LocalStore
from storage.s3 import S3Store

DEFAULT_STORE = "./searchsvc-store"

__all__ = [
    "DEFAULT_STORE", "ArtifactStore", "BucketNotFoundError", "CorruptArtifactError", "InvalidKeyError",
    "KeyNotFoundError", "LocalStore", "S3Store", "SearchsvcError", "StoreAccessError", "StoreError",
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
        return S3Store(parts.netloc, parts.path, endpoint=endpoint, max_attempts=max_attempts)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {uri!r}: file URIs must be file:///absolute/path")
        return LocalStore(parts.path, create=create)
    if parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise StoreError(f"store URI {uri!r}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)")
    return LocalStore(uri, create=create)
