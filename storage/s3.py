"""S3 backend (AWS, MinIO, SeaweedFS): boto3 with adaptive retries and clear errors.

Credentials come only from boto3's own chain (environment, profile, instance role); this module never
reads, stores or prints them. The endpoint is the `endpoint` argument, else boto3's own
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS.

Outages: boto3 retries each request a few times; on top of that, once the store has answered, a
store that stops answering (a restarted MinIO, a network blip) is retried with exponential backoff
for `retry_window_s` seconds (`StoreOptions`, default 120) before the call fails. A
store that never answered fails at once, so a typo in the endpoint is reported in seconds.
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from storage.base import ArtifactStore
from storage.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    StoreAccessError,
    StoreError,
    StoreUnreachableError,
)

MULTIPART_THRESHOLD = 8 << 20  # bytes; files above this are uploaded in parts
PART_SIZE = 8 << 20  # bytes per multipart part (S3 minimum is 5 MiB)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_TRANSIENT = {"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout", "500", "502", "503", "504"}
T = TypeVar("T")
log = logging.getLogger(__name__)


class _PreconditionFailed(StoreError):
    """A conditional write found the key already present (internal: becomes a write-once check)."""


def _endpoint_from_env() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def check_endpoint(endpoint: str | None) -> str | None:
    """Reject endpoint URLs that are malformed or carry credentials (they would end up in logs)."""
    if endpoint is None:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"--s3-endpoint: expected http(s)://host[:port], got {endpoint!r}")
    if parts.username or parts.password:
        raise StoreError("--s3-endpoint: credentials in the URL are not accepted; use AWS_ACCESS_KEY_ID / a profile")
    return endpoint


class S3Store(ArtifactStore):
    """An artifact store under `s3://bucket/prefix`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        max_attempts: int = 4,
        check: bool = True,
        retry_window_s: float = 120.0,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = check_endpoint(endpoint) or _endpoint_from_env()
        self.max_attempts = max_attempts  # boto3's tries per request, first included (backoff 1, 2, 4 s)
        self.retry_window_s = retry_window_s  # seconds a reached store may stay unreachable before a call fails
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client: Any = None
        self._reached = False  # True once any call succeeded: from then on outages are waited out
        if check:
            self.check_bucket()

    # Ray ships stores to actors by pickling: a boto3 client cannot travel, so it is rebuilt lazily.
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            config = Config(
                retries={"mode": "adaptive", "max_attempts": self.max_attempts},
                connect_timeout=5,  # seconds
                read_timeout=60,  # seconds
                # MinIO and SeaweedFS reject or mis-handle the newer default CRC checksums.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"} if self.endpoint else {},
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _where(self) -> str:
        return self.endpoint or "AWS S3"

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`_call_once`, retried with backoff while a store that answered before is unreachable."""
        deadline, delay = None, 0.5  # seconds; the delay doubles up to 8 s
        while True:
            try:
                result = self._call_once(what, fn)
                if deadline is not None:
                    log.warning("S3 endpoint %s answers again", self._where())
                self._reached = True
                return result
            except StoreUnreachableError as err:
                if not self._reached:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_window_s
                    log.warning("%s; retrying for up to %.0f s", err, self.retry_window_s)
                if now >= deadline:
                    raise StoreUnreachableError(f"{err} (still unreachable after {self.retry_window_s:.0f} s of "
                                                "retries)") from None
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, 8.0)

    def _call_once(self, what: str, fn: Callable[[], T]) -> T:
        """Run one boto3 call, turning its exceptions into store errors that name the key."""
        try:
            return fn()
        except (bex.ConnectionError, bex.ReadTimeoutError) as err:  # refused, reset, timed out
            raise StoreUnreachableError(f"cannot reach S3 endpoint {self._where()} ({what}): {err}") from None
        except (bex.NoCredentialsError, bex.PartialCredentialsError):
            raise StoreAccessError(
                f"no S3 credentials for {what}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile"
            ) from None
        except bex.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise self._no_bucket() from None
            if code in _DENIED:
                raise StoreAccessError(f"access denied by {self._where()} for {what} ({code})") from None
            if code in _PRECONDITION:
                raise _PreconditionFailed(f"{what} already exists") from None
            if code in _MISSING_KEY:
                raise KeyNotFoundError(f"{what} does not exist") from None
            if code in _TRANSIENT:  # boto3 retried it already: the server is up but not serving
                raise StoreUnreachableError(f"S3 endpoint {self._where()} is not serving ({what}): {code}") from None
            raise StoreError(f"S3 error for {what}: {code}: {err.response.get('Error', {}).get('Message', '')}") from None

    def _no_bucket(self) -> BucketNotFoundError:
        return BucketNotFoundError(f"bucket '{self.bucket}' does not exist at {self._where()}; create it first")

    def check_bucket(self) -> None:
        """Fail early, and say so plainly, if the endpoint is down or the bucket is missing."""
        try:
            self._call(f"s3://{self.bucket}", lambda: self.client.head_bucket(Bucket=self.bucket))
        except KeyNotFoundError:
            # head_bucket answers a bare 404 for a missing bucket.
            raise self._no_bucket() from None

    def arrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow S3FileSystem, "bucket/prefix") for libraries that write through pyarrow (Ray Tune).

        The bucket is checked with boto3 first: pyarrow's own error for a missing bucket is misleading.
        """
        from pyarrow import fs

        self.check_bucket()
        options: dict[str, Any] = {}
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            options = {"endpoint_override": parts.netloc, "scheme": parts.scheme}
        region = self.client.meta.region_name or "us-east-1"
        return fs.S3FileSystem(region=region, **options), f"{self.bucket}/{self.prefix}".rstrip("/")

    def _put(self, key: str, data: bytes, if_absent: bool) -> bool:
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self._call(self.uri_for(key), lambda: self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, **extra))
        except _PreconditionFailed:
            return False
        return True

    def _put_file(self, key: str, path: Path, if_absent: bool) -> bool:
        size = path.stat().st_size
        if size <= MULTIPART_THRESHOLD:
            return self._put(key, path.read_bytes(), if_absent)
        return self._multipart(key, path, if_absent)

    def _multipart(self, key: str, path: Path, if_absent: bool) -> bool:
        """Upload in PART_SIZE parts; with `if_absent` the completion is conditional (IfNoneMatch)."""
        uri, s3key = self.uri_for(key), self._key(key)
        if if_absent and self.exists(key):
            return False
        upload = self._call(uri, lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=s3key))
        upload_id = upload["UploadId"]
        try:
            parts = []
            with open(path, "rb") as handle:
                for number, chunk in enumerate(iter(lambda: handle.read(PART_SIZE), b""), start=1):
                    part = self._call(uri, lambda: self.client.upload_part(
                        Bucket=self.bucket, Key=s3key, UploadId=upload_id, PartNumber=number, Body=chunk))
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
            extra = {"IfNoneMatch": "*"} if if_absent else {}
            self._call(uri, lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=s3key, UploadId=upload_id, MultipartUpload={"Parts": parts}, **extra))
            return True
        except _PreconditionFailed:
            self._abort(s3key, upload_id)
            return False
        except BaseException:
            self._abort(s3key, upload_id)
            raise

    def _abort(self, s3key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=s3key, UploadId=upload_id)
        except (bex.BotoCoreError, bex.ClientError):
            pass  # best effort: the bucket's lifecycle rules clean up abandoned parts

    def _get(self, key: str) -> bytes:
        uri = self.uri_for(key)
        # One call for request and body, so a connection lost mid-body is retried as a whole.
        return self._call(uri, lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def _get_to_file(self, key: str, path: Path) -> None:
        self._call(self.uri_for(key), lambda: self.client.download_file(self.bucket, self._key(key), str(path)))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object at `key` from byte `start`: one ranged GET (a Parquet footer or row group,
        not the whole object)."""
        if length <= 0:
            return b""
        ranged = f"bytes={start}-{start + length - 1}"  # HTTP ranges are inclusive
        return self._call(self.uri_for(key), lambda: self.client.get_object(
            Bucket=self.bucket, Key=self._key(key), Range=ranged)["Body"].read())

    def size(self, key: str) -> int:
        """Bytes of the object at `key`."""
        head = self._call(self.uri_for(key), lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return int(head["ContentLength"])

    def open_ranged(self, key: str) -> RangedObject:
        """The object at `key` as a read-only, seekable file whose reads are ranged GETs (nothing read ahead)."""
        return RangedObject(self, key)

    def exists(self, key: str) -> bool:
        try:
            self._call(self.uri_for(key), lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except KeyNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self.versions(prefix))

    def versions(self, prefix: str = "") -> dict[str, str]:
        """Every key under `prefix` with its version: size and ETag (a digest of the content), one listing."""
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        pages = self._call(f"{self.uri}/{prefix}", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        return {obj["Key"][strip:]: f"{obj.get('Size', 0)} {obj.get('ETag', '')}"
                for page in pages for obj in page.get("Contents", [])}


class RangedObject(io.RawIOBase):
    """An S3 object read as a file: each `read` is one ranged GET of the bytes asked for. What readers that seek
    (pyarrow's Parquet reader: the footer, then one row group's column chunks) need, without the rest."""

    def __init__(self, store: S3Store, key: str) -> None:
        super().__init__()
        self.store, self.key = store, key
        self.length = store.size(key)  # bytes
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.length if size is None or size < 0 else min(self.length, self.position + size)
        data = self.store.get_range(self.key, self.position, end - self.position)
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
