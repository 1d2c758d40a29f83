"""Image folders, on local disk or on S3 (`dataset.root: s3://bucket/prefix`, read through the store's endpoint and
credentials): class sub-folders of images, decoded whole into memory or read file by file while training.

    root/train/<class>/*, root/test/<class>/* [, root/val/<class>/*]   the splits as given (val: optional)
    root/<class>/*                                                    a test share split off by split_seed

Each node reads what it needs, where its workers run: the resident path reads every file once, the streamed path
reads each batch's files when a DataLoader worker decodes it; nothing is copied to a node's disk first. A file
that is not a readable image stops the read naming it (`bad_files: stop`), or (`skip`) is left out of a resident
split and, in a streamed one, stands in for by the next readable example of its split (so batches keep their
size; its label goes with it).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset

from core.errors import SearchsvcError
from workers.data.sources import Loaded
from workers.data.streaming import Streamed

log = logging.getLogger(__name__)
TEST_FRACTION = 0.2  # share of a single-folder layout held out as the test split
SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
S3_READERS = 8  # objects read at once when a resident split is read from S3 (each one a GET, latency-bound)


class Files:
    """The files under a folder or an S3 prefix: their keys (paths relative to the root, '/'-separated) and their
    bytes. On S3 each process opens its own client (DataLoader workers are forked: a client is not shared)."""

    def __init__(self, root: str, endpoint: str | None = None) -> None:
        self.root, self.endpoint = root.rstrip("/"), endpoint
        self._store: Any = None
        self._pid = -1
        self._versions: dict[str, str] = {}  # key → its version as the listing saw it (fingerprint)

    @property
    def on_s3(self) -> bool:
        return self.root.startswith("s3://")

    def where(self, key: str) -> str:
        return f"{self.root}/{key}"

    def keys(self) -> list[str]:
        """Every file's key, in path order (a folder's files before a sibling folder named after them, as on disk)."""
        if self.on_s3:
            self._versions = self._s3().versions("")
        else:
            base = Path(self.root).expanduser()
            if not base.is_dir():
                raise SearchsvcError(f"dataset.root: {base} is not a folder")
            # sizes, not modification times: each node of a cluster may hold its own copy of the folder
            self._versions = {p.relative_to(base).as_posix(): str(p.stat().st_size) for p in base.rglob("*")
                              if p.is_file()}
        return sorted(self._versions, key=lambda key: key.split("/"))

    def fingerprint(self) -> str:
        """What the files under the root are, as of the last `keys()` listing: a digest of their names and sizes
        (and ETags, digests of the content, on S3) — not of their bytes, which would mean reading them all.
        Part of every identity of the data (DatasetConfig.fingerprint): other files, or changed ones, are other
        data."""
        lines = "".join(f"{key}\t{version}\n" for key, version in sorted(self._versions.items()))
        return hashlib.sha256(lines.encode()).hexdigest()[:16]

    def read(self, key: str) -> bytes:
        if self.on_s3:
            return self._s3()._get(key)  # any object name the user has (the store's own keys are stricter)
        return (Path(self.root).expanduser() / key).read_bytes()

    def open_file(self, key: str) -> BinaryIO:
        """The file at `key` to read with seeks: on S3 each read is a ranged GET (nothing downloaded whole)."""
        if self.on_s3:
            return self._s3().open_ranged(key)
        return (Path(self.root).expanduser() / key).open("rb")

    def _s3(self) -> Any:
        from storage import StoreError, open_store

        if self._store is None or self._pid != os.getpid():
            try:
                self._store = open_store(self.root, endpoint=self.endpoint, create=False)
            except StoreError as err:
                raise SearchsvcError(f"dataset.root: {self.root}: {err}") from None
            self._pid = os.getpid()
        return self._store

    def __getstate__(self) -> dict[str, Any]:  # travels to Ray workers without a client
        return {**self.__dict__, "_store": None, "_pid": -1}


@dataclass
class Layout:
    """An image folder's splits as files: split name → (keys, class indices), the classes, and each split's source
    as run.json states it. `val` is absent where the folder has none (then it is carved from train)."""

    files: dict[str, tuple[list[str], list[int]]]
    classes: list[str]
    sources: dict[str, str]


def layout(files: Files, seed: int) -> Layout:
    """Which image files make which split (the module's docstring), checked: every class of test/ and val/ is one
    of train/'s, and no split is empty."""
    images = [key for key in files.keys() if Path(key).suffix.lower() in SUFFIXES and "/" in key]
    tops = {key.split("/", 1)[0] for key in images}
    if {"train", "test"} <= tops:
        classes = sorted({key.split("/")[1] for key in images if key.startswith("train/") and key.count("/") >= 2})
        names = ("train", "test", "val") if "val" in tops else ("train", "test")
        found = {name: _split(images, f"{name}/", classes, files) for name in names}
        return Layout(found, classes, {name: files.where(name) for name in names})
    if tops & {"train", "val", "test"}:
        raise SearchsvcError(f"dataset.root: {files.root} has {'/, '.join(sorted(tops & {'train', 'val', 'test'}))}/ "
                             f"but not both train/ and test/: give train/ and test/ (and val/ if you have one), or "
                             f"class folders alone")
    classes = sorted({key.split("/")[0] for key in images})
    keys, labels = _split(images, "", classes, files)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 7)).tolist()
    n_test = max(1, int(round(TEST_FRACTION * len(labels))))
    pick = lambda index: ([keys[i] for i in index], [labels[i] for i in index])  # noqa: E731
    return Layout({"train": pick(order[n_test:]), "test": pick(order[:n_test])}, classes,
                  {"train": f"{files.root} less its test share", "test": f"{TEST_FRACTION:.0%} of {files.root} by "
                                                                         f"split_seed"})


def _split(images: list[str], prefix: str, classes: list[str], files: Files) -> tuple[list[str], list[int]]:
    """The image keys under `prefix`<class>/ with their class index, in the classes' order."""
    if not classes:
        raise SearchsvcError(f"dataset.root: {files.where(prefix)} has no class sub-folders")
    index = {name: i for i, name in enumerate(classes)}
    found: dict[str, list[str]] = {name: [] for name in classes}
    for key in images:
        if not key.startswith(prefix) or key[len(prefix):].count("/") < 1:
            continue
        name = key[len(prefix):].split("/", 1)[0]
        if name not in index:
            raise SearchsvcError(f"dataset.root: {files.where(prefix + name)} is a class train/ does not have")
        found[name].append(key)
    keys = [key for name in classes for key in found[name]]
    if not keys:
        raise SearchsvcError(f"dataset.root: no images found under {files.where(prefix.rstrip('/'))}")
    return keys, [index[key[len(prefix):].split("/", 1)[0]] for key in keys]


def decode(raw: bytes, where: str, size: int) -> torch.Tensor:
    """An image file's bytes as uint8 RGB [3, size, size]; SearchsvcError naming the file if they are no image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise SearchsvcError(f"dataset file {where} is not a readable image: {err}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def read_all(files: Files, found: Layout, size: int, skip_bad: bool) -> Loaded:
    """Every split decoded into memory (S3 objects read S3_READERS at a time)."""
    decoded = {name: _read_split(files, keys, labels, size, skip_bad) for name, (keys, labels) in found.files.items()}
    return Loaded(decoded["train"], decoded["test"], len(found.classes), decoded.get("val"), found.sources)


def _read_split(files: Files, keys: list[str], labels: list[int], size: int, skip_bad: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    def one(key: str) -> torch.Tensor | None:
        try:
            return decode(files.read(key), files.where(key), size)
        except SearchsvcError:
            if skip_bad:
                return None
            raise
        except OSError as err:
            raise SearchsvcError(f"dataset file {files.where(key)}: cannot read ({type(err).__name__})") from None

    with ThreadPoolExecutor(S3_READERS if files.on_s3 else 1) as pool:
        images, kept = into_rows(pool.map(one, keys), len(keys), size, files.root, "files")
    return images, torch.tensor(labels, dtype=torch.int64)[kept]


def into_rows(images: Iterable[torch.Tensor | None], count: int, size: int, root: str, unit: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` decoded images (None: an unreadable one, left out under bad_files: skip) as one uint8 tensor
    [kept, 3, size, size], each written into its row as it comes — a list stacked at the end held the split twice
    (a 1.4 GiB folder peaked at 4.0 GiB) — and the positions kept. Warns how many `unit`s (files, rows) were left
    out; SearchsvcError if none is readable."""
    out = torch.empty((count, 3, size, size), dtype=torch.uint8)
    kept = []
    for i, image in enumerate(images):
        if image is not None:
            out[i] = image
            kept.append(i)
    index = torch.tensor(kept, dtype=torch.int64)
    if len(kept) < count:
        log.warning("dataset: %d of %d %s under %s are not readable images: left out (bad_files: skip)",
                    count - len(kept), count, unit, root)
        if not kept:
            raise SearchsvcError(f"dataset.root: no readable images under {root}")
        out = out[index]
    return out, index


def streamed(files: Files, found: Layout, size: int, skip_bad: bool, workers: int) -> Loaded:
    """Every split read file by file while training (workers.data.streaming)."""
    split = lambda keys, labels: Streamed(  # noqa: E731
        ImageFiles(files, keys, labels, size, skip_bad), torch.tensor(labels, dtype=torch.int64), (3, size, size),
        torch.uint8, workers=workers)
    return Loaded(*(split(*found.files[name]) for name in ("train", "test")), len(found.classes),
                  split(*found.files["val"]) if "val" in found.files else None,
                  {name: f"{text} (streamed)" for name, text in found.sources.items()})


class ImageFiles(Dataset):
    """An image folder's files, each read and decoded to uint8 RGB [3, S, S] when asked for."""

    def __init__(self, files: Files, keys: list[str], labels: list[int], size: int, skip_bad: bool) -> None:
        self.files, self.keys, self.labels, self.size, self.skip_bad = files, keys, labels, size, skip_bad

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for step in range(len(self.keys) if self.skip_bad else 1):
            at = (index + step) % len(self.keys)
            try:
                return decode(self.files.read(self.keys[at]), self.files.where(self.keys[at]), self.size), \
                    self.labels[at]
            except SearchsvcError:
                if not self.skip_bad:
                    raise
        raise SearchsvcError(f"dataset.root: no readable images under {self.files.root}")
