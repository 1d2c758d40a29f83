"""Local-folder backend: every write goes to a temp file in the target folder, then an atomic rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from storage.base import ArtifactStore
from storage.errors import InvalidKeyError, KeyNotFoundError, StoreError, StoreWriteError

_TMP_PREFIX = ".tmp-"


def local_root(folder: str | Path) -> Path:
    """The absolute folder a local store at `folder` lives in (`~` expanded, links followed)."""
    return Path(folder).expanduser().resolve()


class LocalStore(ArtifactStore):
    """An artifact store in a local folder (`./searchsvc-store` by default)."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        self.root = local_root(root)
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} exists and is not a folder")
        if not self.root.exists():
            if not create:
                raise StoreError(f"store {self.root} does not exist")
            try:
                self.root.mkdir(parents=True)
            except OSError as err:  # a path through a file (/dev/null/x), a read-only or full disk, no permission
                raise StoreError(f"store {self.root}: cannot create the folder ({err.strerror})") from None
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _write_temp(self, target: Path, write: Callable[[BinaryIO], object]) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    def _commit(self, tmp: Path, target: Path, if_absent: bool) -> bool:
        try:
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent on POSIX.
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
            return True
        finally:
            if tmp.exists():
                tmp.unlink()

    def _put(self, key: str, data: bytes, if_absent: bool) -> bool:
        target = self._path(key)
        with self._writing(key):
            return self._commit(self._write_temp(target, lambda h: h.write(data)), target, if_absent)

    def _put_file(self, key: str, path: Path, if_absent: bool) -> bool:
        target = self._path(key)

        def copy(handle: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, handle, 1 << 20)

        with self._writing(key):
            return self._commit(self._write_temp(target, copy), target, if_absent)

    @contextmanager
    def _writing(self, key: str) -> Iterator[None]:
        """A write the file system refuses (read-only, full, no permission) as one StoreError naming the key;
        the file that was there is untouched (writes go to a temp file, then a rename)."""
        try:
            yield
        except OSError as err:
            if err.strerror is None:  # not the file system's refusal: a bug keeps its traceback
                raise
            raise StoreWriteError(f"cannot write {self.uri_for(key)}: {err.strerror}") from None

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFoundError(f"{self.uri_for(key)} does not exist") from None

    def _get_to_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise KeyNotFoundError(f"{self.uri_for(key)} does not exist")
        shutil.copyfile(source, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if prefix.startswith("/") or any(part in ("..", ".") for part in prefix.split("/")):
            raise InvalidKeyError(f"invalid store prefix {prefix!r}")
        keys = []
        # Walk only below the deepest folder the prefix names, not the whole store.
        start = self.root.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else self.root
        for dirpath, _, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def arrow_filesystem(self) -> tuple[Any, str]:
        """(pyarrow LocalFileSystem, root path) for libraries that write through pyarrow (Ray Tune)."""
        from pyarrow import fs

        return fs.LocalFileSystem(), str(self.root)

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()
