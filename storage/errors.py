"""What can go wrong with the artifact store: each a `SearchsvcError` (one line, exit 2 at the CLI)."""

from __future__ import annotations

from core.errors import SearchsvcError


class StoreError(SearchsvcError):
    """Something is wrong with the artifact store (URI, endpoint, bucket, permissions, contents)."""


class InvalidKeyError(StoreError):
    """A store key (or an id that becomes part of one) would escape its prefix or is malformed."""


class KeyNotFoundError(StoreError):
    """The key does not exist in the store."""


class StoreUnreachableError(StoreError):
    """The S3 endpoint does not answer."""


class BucketNotFoundError(StoreError):
    """The S3 bucket does not exist."""


class StoreAccessError(StoreError):
    """Credentials are missing or are refused by the S3 server."""


class StoreWriteError(StoreError):
    """The store's file system refuses a write: read-only, full, or no permission."""


class WriteConflictError(StoreError):
    """A write-once key already holds different content."""


class CorruptArtifactError(StoreError):
    """An artifact's bytes do not match the sha256 recorded in its manifest."""
