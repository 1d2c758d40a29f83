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


class UnsavedResult(StoreUnreachableError):
    """A finished evaluation whose files could not be stored: they travel with the error (key → bytes)
    so the driver can keep them on local disk instead of losing them."""

    def __init__(self, message: str, files: dict[str, bytes], metrics: dict) -> None:
        super().__init__(message)
        self.files, self.metrics = files, metrics

    def __reduce__(self):  # Ray pickles a worker's exception back to the driver: keep the payload
        return (type(self), (str(self), self.files, self.metrics))


class BucketNotFoundError(StoreError):
    """The S3 bucket does not exist."""


class StoreAccessError(StoreError):
    """Credentials are missing or are refused by the S3 server."""


class WriteConflictError(StoreError):
    """A write-once key already holds different content."""


class CorruptArtifactError(StoreError):
    """An artifact's bytes do not match the sha256 recorded in its manifest."""
