"""Errors a user can cause. The base class lives in the lowest layer so every layer can raise it.

The CLI turns any `SearchsvcError` into one line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SearchsvcError(Exception):
    """An error caused by the user's input or environment; its message names the key or path."""


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
