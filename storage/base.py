"""The `ArtifactStore` interface: one set of operations, the same keys on every backend.

Backends implement five primitives (`_put`, `_get`, `exists`, `list`, `_get_to_file`/`_put_file`);
everything else — write-once semantics, JSON, Parquet tables, manifests — is built here once.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import CorruptArtifactError, InvalidKeyError, KeyNotFoundError, WriteConflictError

MANIFEST = "manifest.json"
# Where results that cannot reach a store are kept meanwhile (storage.spool), unless StoreOptions says otherwise.
DEFAULT_SPOOL_ROOT = Path.home() / ".cache" / "searchsvc" / "pending"
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]*")  # matched in full (fullmatch: no trailing newline)
MAX_ID = 128  # characters of a run id or spec hash (ours are 16-32): checked before any file-system call
_HASH_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def check_key(key: str) -> str:
    """Return `key` if it is a safe relative key ('a/b.json'); raise InvalidKeyError otherwise."""
    if not isinstance(key, str) or not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(f"invalid store key {key!r}: must be a relative path like 'runs/x/config.yaml'")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or len(segment) > 255 or not _SEGMENT.fullmatch(segment):
            raise InvalidKeyError(f"invalid store key {key!r}: segment {segment!r} is not allowed")
    return key


def check_id(value: str, what: str = "id") -> str:
    """Validate a run id or spec hash that becomes one key segment (no '/', no '..', at most MAX_ID characters)."""
    if not isinstance(value, str) or not value:
        raise InvalidKeyError(f"invalid {what}: it is empty")
    if len(value) > MAX_ID:
        raise InvalidKeyError(f"invalid {what} {value[:24]!r}... ({len(value)} characters; at most {MAX_ID})")
    if not _SEGMENT.fullmatch(value) or value in (".", ".."):
        raise InvalidKeyError(f"invalid {what} {value!r}: use letters, digits, '.', '_', '-' only")
    return value


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_bytes(obj: Any) -> bytes:
    """The stored form of JSON: indented, key-sorted, newline-terminated (same object, same bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


# The checksum a record carries of its own content: records with no manifest over them (a run's evals/<hash>.json,
# written once) or rewritten as a run goes (run.json) are checked by it on every read (`get_mapping`).
RECORD_SHA256 = "record_sha256"


def record_sha256(record: Mapping[str, Any]) -> str:
    """sha256 of a record's content as stored: its canonical JSON (sorted keys, no whitespace), less its checksum."""
    content = json.loads(json.dumps({k: v for k, v in record.items() if k != RECORD_SHA256}, default=str))
    return sha256_bytes(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def sealed(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` carrying the checksum of its content (RECORD_SHA256). `put_json` keeps it current: a sealed record
    rewritten with changes (run.json) is stored sealed again."""
    return {**record, RECORD_SHA256: record_sha256(record)}


def arrow_owned(data: bytes) -> pa.Buffer:
    """`data` copied into memory Arrow allocated itself, for readers that run on Arrow's thread pools.

    Why: `pq.read_table` scans asynchronously, and its worker threads may drop the last reference to the
    input's buffers *after* it returns. When those buffers are Python objects (`io.BytesIO`, or `bytes` wrapped
    by `pa.BufferReader`/`pa.py_buffer`), that drop takes the GIL (`arrow::py::PyBuffer::~PyBuffer`). If the
    interpreter is finalizing by then, CPython <= 3.13 ends the thread with `pthread_exit`, whose unwind runs
    into a noexcept C++ frame: `std::terminate` — "terminate called without an active exception", exit 134,
    in about 1 process in 10 under load (apache/arrow#34314; CPython gh-87135 makes such threads hang
    instead from 3.14). Arrow-owned memory needs no GIL to free, so the race has nothing to lose.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return sink.getvalue()


class ArtifactStore(ABC):
    """A key/value store of artifacts addressed by relative keys such as 'runs/<id>/config.yaml'."""

    uri: str

    # ---- primitives each backend implements -------------------------------------------------
    @abstractmethod
    def _put(self, key: str, data: bytes, if_absent: bool) -> bool:
        """Store `data`; with `if_absent`, store only if the key is new. Return False if it was not."""

    @abstractmethod
    def _put_file(self, key: str, path: Path, if_absent: bool) -> bool:
        """Like `_put` for a file on disk (large files stream; S3 uses multipart)."""

    @abstractmethod
    def _get(self, key: str) -> bytes:
        """Return the bytes at `key`; raise KeyNotFoundError if it is missing."""

    @abstractmethod
    def _get_to_file(self, key: str, path: Path) -> None:
        """Copy the object at `key` to the local file `path`."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if an object is stored at `key`."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under `prefix` (recursive), sorted."""

    @abstractmethod
    def arrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow filesystem, base path) addressing this store's root, for Ray Tune's storage_path."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """A URI a user can paste: file:///... or s3://bucket/prefix/key."""

    # ---- bytes and files ----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, write_once: bool = False) -> str:
        """Store `data` at `key` and return its sha256.

        With `write_once`, a second writer of identical content succeeds (idempotent) and one with
        different content raises WriteConflictError; the stored object is never replaced.
        """
        check_key(key)
        digest = sha256_bytes(data)
        if not self._put(key, data, if_absent=write_once):
            self._check_same(key, digest)
        return digest

    def put_file(self, key: str, path: str | Path, write_once: bool = False) -> str:
        """Store a local file at `key` (multipart on S3 for large files); return its sha256."""
        check_key(key)
        path = Path(path)
        digest = sha256_file(path)
        if not self._put_file(key, path, if_absent=write_once):
            self._check_same(key, digest)
        return digest

    def get_bytes(self, key: str) -> bytes:
        """The bytes stored at `key`."""
        return self._get(check_key(key))

    def get_file(self, key: str, path: str | Path) -> Path:
        """Download `key` to `path` (parent folders are created); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._get_to_file(check_key(key), path)
        return path

    def put_tree(self, prefix: str, folder: str | Path) -> int:
        """Upload every file under a local folder to `<prefix>/<relative path>`; return the file count."""
        folder = Path(folder)
        files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
        for path in files:
            self.put_file(f"{check_key(prefix)}/{path.relative_to(folder).as_posix()}", path)
        return len(files)

    def get_tree(self, prefix: str, folder: str | Path) -> int:
        """Download every object under `<prefix>/` into a local folder; return the file count."""
        keys = self.list(check_key(prefix) + "/")
        for key in keys:
            self.get_file(key, Path(folder) / key[len(prefix) + 1 :])
        return len(keys)

    def _check_same(self, key: str, digest: str) -> None:
        existing = sha256_bytes(self._get(key))
        if existing != digest:
            raise WriteConflictError(
                f"{self.uri_for(key)} already exists with different content "
                f"(stored sha256 {existing[:12]}, new {digest[:12]}); it is write-once and was kept"
            )

    # ---- structured data ------------------------------------------------------------------------
    def put_json(self, key: str, obj: Any, write_once: bool = False) -> str:
        """Store `obj` as indented, key-sorted JSON (`json_bytes`); a mapping that carries RECORD_SHA256 is stored
        `sealed` anew (the checksum of what is written, whatever the caller changed since it was sealed)."""
        if isinstance(obj, Mapping) and RECORD_SHA256 in obj:
            obj = sealed(obj)
        return self.put_bytes(key, json_bytes(obj), write_once=write_once)

    def get_json(self, key: str) -> Any:
        """Load the JSON stored at `key`; CorruptArtifactError naming it if it is not UTF-8 JSON."""
        try:
            return json.loads(self.get_bytes(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptArtifactError(f"{self.uri_for(key)} is not valid JSON: {err}") from None

    def get_mapping(self, key: str) -> dict[str, Any]:
        """The JSON object stored at `key` (a record: run.json, an evaluation, a manifest); anything else stored
        there, or a sealed record whose content no longer matches its RECORD_SHA256, is a CorruptArtifactError
        naming it. A sealed record comes back with its checksum (rewriting it keeps it sealed)."""
        value = self.get_json(key)
        if not isinstance(value, dict):
            raise CorruptArtifactError(f"{self.uri_for(key)} is corrupt: a JSON object was expected, "
                                       f"found {type(value).__name__}")
        if RECORD_SHA256 in value and value[RECORD_SHA256] != record_sha256(value):
            raise CorruptArtifactError(f"{self.uri_for(key)} is corrupt: its content does not match the "
                                       f"{RECORD_SHA256} written with it (edited after it was written?)")
        return value

    def put_table(self, key: str, table: pa.Table) -> str:
        """Store a Parquet table; the whole object is replaced atomically."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.put_bytes(key, sink.getvalue().to_pybytes())

    def get_table(self, key: str) -> pa.Table:
        """Read the Parquet table at `key`."""
        try:
            return pq.read_table(pa.BufferReader(arrow_owned(self.get_bytes(key))))
        except (pa.ArrowInvalid, OSError) as err:
            raise CorruptArtifactError(f"{self.uri_for(key)} is not a readable Parquet file: {err}") from None

    # ---- manifests ------------------------------------------------------------------------------
    def write_manifest(self, prefix: str, written: dict[str, bytes] | None = None) -> dict[str, dict[str, Any]]:
        """Record sha256 and size of every object under `prefix` in `<prefix>/manifest.json`.

        `written`: the caller's files (name under `prefix` → the bytes it just stored), hashed from memory:
        no listing and no read-back, which a candidate's save would otherwise pay per file (S3 GETs).
        The manifest is written last and once, so its presence marks the folder as complete.
        """
        prefix = check_key(prefix)
        if written is None:
            names = [key[len(prefix) + 1 :] for key in self.list(prefix + "/")]
            written = {name: self._get(f"{prefix}/{name}") for name in names if name != MANIFEST}
        entries = {name: {"sha256": sha256_bytes(data), "bytes": len(data)} for name, data in written.items()}
        self.put_json(f"{prefix}/{MANIFEST}", {"files": entries}, write_once=True)
        return entries

    def manifest_files(self, prefix: str) -> dict[str, dict[str, Any]]:
        """The files `<prefix>/manifest.json` lists (name → sha256 and bytes); KeyNotFoundError without one."""
        manifest_key = f"{check_key(prefix)}/{MANIFEST}"
        try:
            files = self.get_mapping(manifest_key).get("files", {})
        except KeyNotFoundError:
            raise KeyNotFoundError(f"{self.uri_for(prefix)} has no {MANIFEST}: the artifact is incomplete") from None
        entries = files.values() if isinstance(files, dict) else [None]
        if not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
            raise CorruptArtifactError(f"{self.uri_for(manifest_key)} is corrupt: every file needs a sha256")
        return files

    def verify(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Check every file listed in `<prefix>/manifest.json`; raise CorruptArtifactError on a mismatch."""
        files = self.manifest_files(prefix)
        for name in files:
            self._checked(prefix, name, files)
        return files

    def get_verified(self, prefix: str, name: str) -> bytes:
        """The bytes of `<prefix>/<name>`, checked against the folder's manifest."""
        return self._checked(prefix, name, self.manifest_files(prefix))

    def _checked(self, prefix: str, name: str, files: dict[str, dict[str, Any]]) -> bytes:
        key = f"{prefix}/{name}"
        if name not in files:
            raise KeyNotFoundError(f"{self.uri_for(key)} is not in the manifest")
        try:
            data = self._get(check_key(key))
        except KeyNotFoundError:
            raise CorruptArtifactError(f"{self.uri_for(key)} is listed in the manifest but missing") from None
        digest = sha256_bytes(data)
        if digest != files[name]["sha256"]:
            raise CorruptArtifactError(f"{self.uri_for(key)} is corrupt: sha256 {digest[:12]} does not match the "
                                       f"manifest's {files[name]['sha256'][:12]}")
        return data

    spool_root: Path = DEFAULT_SPOOL_ROOT  # this store's pending writes (storage.spool); `open_store` sets it

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
