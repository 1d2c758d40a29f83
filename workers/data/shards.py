"""Sharded data (`dataset.name: shards`): Parquet files of encoded images and their labels, on local disk or on S3
(`root: s3://bucket/prefix`, read through the store's endpoint and credentials).

    root/train/*.parquet, root/test/*.parquet [, root/val/*.parquet]    columns: image (binary), label (integer)

`image` holds a file's bytes as they were (PNG, JPEG: decoded as an image folder's files are, `dataset.image_size`
alike), `label` the class index. Why Parquet, not WebDataset tar shards: a footer gives every row group's row count
without reading data; the `label` column is read without the images (class counts, and every example's label known
up front, as a streamed split needs); a row group (about ROWS_PER_GROUP rows) is read alone, so a reader seeks to
the rows it needs where a tar is read front to back; pyarrow is already a dependency.

Resident (`in_memory: true`, or `auto` where it fits): every row decoded once. Streamed: a map-style dataset whose
example i is a row of one row group; each DataLoader process reads a row group (on S3: ranged GETs of its column
chunk, never the whole shard) and keeps the last CACHED_GROUPS, and the split's epoch order goes row group by row
group (workers.data.streaming.epoch_order), so a row group is read once per epoch per DataLoader process. A row whose
image cannot be decoded stops the read naming the file and row (`bad_files: stop`) or, with `skip`, is left out of a
resident split and stood in for by the next readable row in a streamed one, as in an image folder.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from core.errors import SearchsvcError
from workers.data.folders import S3_READERS, Files, decode, into_rows
from workers.data.folders import layout as folders_layout
from workers.data.sources import Loaded
from workers.data.streaming import Streamed

log = logging.getLogger(__name__)
SUFFIX = ".parquet"
SPLITS = ("train", "test", "val")
ROWS_PER_GROUP = 1000  # rows a row group holds as the writer makes them: the unit read at once (~1,000 images)
CACHED_GROUPS = 2  # row groups each reading process keeps: a batch may straddle two


@dataclass(frozen=True)
class Group:
    """One row group of one shard: the unit a streamed split reads."""

    key: str  # the shard's key under the root
    index: int  # the row group's index in its shard
    rows: int


@dataclass
class Part:
    """One split's shards: its row groups in order (shards by name, row groups as stored) and every row's label."""

    groups: list[Group]
    labels: torch.Tensor  # [rows] int64
    shards: int

    def blocks(self) -> torch.Tensor:
        """[rows] the row group each row is in (numbered across the split)."""
        return torch.repeat_interleave(torch.arange(len(self.groups)), torch.tensor([g.rows for g in self.groups]))


def index(files: Files) -> dict[str, Part]:
    """Each split's shards (split name → Part; val only where root/val/ has shards), their columns and labels
    checked. Reads the footers and the label columns, no image."""
    keys = [key for key in files.keys() if key.endswith(SUFFIX)]
    found = {name: [key for key in keys if key.startswith(f"{name}/")] for name in SPLITS}
    missing = [f"{name}/*{SUFFIX}" for name in ("train", "test") if not found[name]]
    if missing:
        raise SearchsvcError(f"dataset.root: {files.root} has no {' and no '.join(missing)}: sharded data is "
                             f"train/*{SUFFIX} and test/*{SUFFIX} (val/ optional)")
    return {name: _part(files, name, shard_keys) for name, shard_keys in found.items() if shard_keys}


def _part(files: Files, name: str, keys: list[str]) -> Part:
    with ThreadPoolExecutor(S3_READERS if files.on_s3 else 1) as pool:  # on S3 each footer is a GET: latency
        shards = list(pool.map(lambda key: _shard(files, key), keys))
    groups = [group for shard_groups, _ in shards for group in shard_groups]
    if not groups or sum(g.rows for g in groups) == 0:
        raise SearchsvcError(f"dataset.root: {files.where(name)} holds no rows (an empty split)")
    return Part(groups, torch.from_numpy(np.concatenate([labels for _, labels in shards])), len(keys))


def _shard(files: Files, key: str) -> tuple[list[Group], np.ndarray]:
    """A shard's row groups and labels, its columns checked."""
    where = files.where(key)
    parquet = _open(files, key)
    schema = parquet.schema_arrow
    for column, wanted in (("image", "encoded image bytes (binary)"), ("label", "class indices (integers)")):
        if column not in schema.names:
            raise SearchsvcError(f"dataset file {where} has no column '{column}' ({wanted}); it has "
                                 f"{', '.join(schema.names) or 'none'}")
    if not (pa.types.is_binary(schema.field("image").type) or pa.types.is_large_binary(schema.field("image").type)):
        raise SearchsvcError(f"dataset file {where}: column 'image' holds {schema.field('image').type}, not "
                             f"encoded image bytes (binary)")
    labels = parquet.read(columns=["label"]).column("label")
    if not pa.types.is_integer(labels.type):
        raise SearchsvcError(f"dataset file {where}: column 'label' holds {labels.type}, not integer class indices")
    if labels.null_count:
        raise SearchsvcError(f"dataset file {where}: column 'label' has {labels.null_count} empty (null) rows")
    values = labels.to_numpy().astype(np.int64)
    if (values < 0).any():
        row = int(np.argmax(values < 0))
        raise SearchsvcError(f"dataset file {where}: label {values[row]} in row {row} is not a class (an integer "
                             f">= 0)")
    meta = parquet.metadata
    return [Group(key, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)], values


def _open(files: Files, key: str) -> pq.ParquetFile:
    """The shard at `key` (on S3: read by ranged GETs); SearchsvcError naming it if it is no Parquet file."""
    try:
        return pq.ParquetFile(files.open_file(key))
    except (pa.ArrowException, OSError) as err:
        raise SearchsvcError(f"dataset file {files.where(key)} is not a readable Parquet file: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _images(parquet: pq.ParquetFile, group: int) -> list[bytes | None]:
    return parquet.read_row_group(group, columns=["image"]).column("image").to_pylist()


def classes(parts: dict[str, Part]) -> int:
    """Classes of the data: 0 .. the largest label of any split."""
    return 1 + max(int(part.labels.max()) for part in parts.values())


def sources(files: Files, parts: dict[str, Part]) -> dict[str, str]:
    """Each split's source as run.json states it."""
    return {name: f"{files.where(name)} ({part.shards} Parquet shard{'s' * (part.shards > 1)})"
            for name, part in parts.items()}


def read_all(files: Files, parts: dict[str, Part], size: int, skip_bad: bool) -> Loaded:
    """Every split decoded into memory (shards read S3_READERS at a time from S3)."""
    decoded = {name: _read_split(files, part, size, skip_bad) for name, part in parts.items()}
    return Loaded(decoded["train"], decoded["test"], classes(parts), decoded.get("val"), sources(files, parts))


def _read_split(files: Files, part: Part, size: int, skip_bad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    shard_keys = list(dict.fromkeys(g.key for g in part.groups))  # in order, once each

    def one(key: str) -> list[torch.Tensor | None]:
        parquet, where = _open(files, key), files.where(key)
        rows = [raw for g in range(parquet.metadata.num_row_groups) for raw in _images(parquet, g)]
        return [_decode(raw, where, row, size, skip_bad) for row, raw in enumerate(rows)]

    with ThreadPoolExecutor(S3_READERS if files.on_s3 else 1) as pool:
        rows = (image for shard in pool.map(one, shard_keys) for image in shard)
        images, kept = into_rows(rows, len(part.labels), size, files.root, "rows")
    return images, part.labels[kept]


def _decode(raw: bytes | None, where: str, row: int, size: int, skip_bad: bool) -> torch.Tensor | None:
    """One row's image, or None where it is unreadable and `skip_bad`."""
    try:
        if raw is None:
            raise SearchsvcError(f"dataset file {where} row {row} is not a readable image: it is empty (null)")
        return decode(raw, f"{where} row {row}", size)
    except SearchsvcError:
        if skip_bad:
            return None
        raise


def streamed(files: Files, parts: dict[str, Part], size: int, skip_bad: bool, workers: int) -> Loaded:
    """Every split read row group by row group while training (workers.data.streaming)."""
    split = {name: Streamed(ShardRows(files, part, size, skip_bad), part.labels, (3, size, size), torch.uint8,
                            workers=workers, blocks=part.blocks()) for name, part in parts.items()}
    return Loaded(split["train"], split["test"], classes(parts), split.get("val"),
                  {name: f"{text} (streamed)" for name, text in sources(files, parts).items()})


class ShardRows(Dataset):
    """A split's rows, each decoded to uint8 RGB [3, S, S] when asked for; the row groups last read (CACHED_GROUPS)
    and each shard's footer are kept per process (DataLoader workers are forked: nothing of a parent's is used)."""

    def __init__(self, files: Files, part: Part, size: int, skip_bad: bool) -> None:
        self.files, self.groups, self.size, self.skip_bad = files, part.groups, size, skip_bad
        self.labels = part.labels.tolist()
        self.starts = np.cumsum([0] + [g.rows for g in part.groups]).tolist()  # first row of each row group
        firsts = [b for b, g in enumerate(self.groups) if b == 0 or self.groups[b - 1].key != g.key]
        # The split's row number of each row group's shard's first row: a row is named by its number in its shard.
        self.shard_starts = [self.starts[firsts[bisect.bisect_right(firsts, b) - 1]] for b in range(len(self.groups))]
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._shards: dict[str, pq.ParquetFile] = {}
        self._cached: OrderedDict[int, list[bytes | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for step in range(len(self) if self.skip_bad else 1):
            at = (index + step) % len(self)
            block = bisect.bisect_right(self.starts, at) - 1
            group, row = self.groups[block], at - self.starts[block]
            image = _decode(self._rows(block)[row], self.files.where(group.key), at - self.shard_starts[block],
                            self.size, self.skip_bad)
            if image is not None:
                return image, self.labels[at]
        raise SearchsvcError(f"dataset.root: no readable images under {self.files.root}")

    def _rows(self, block: int) -> list[bytes | None]:
        if self._pid != os.getpid():
            self._reset()
        if block in self._cached:
            self._cached.move_to_end(block)
            return self._cached[block]
        group = self.groups[block]
        if group.key not in self._shards:  # its footer read once per process
            self._shards[group.key] = _open(self.files, group.key)
        rows = self._cached[block] = _images(self._shards[group.key], group.index)
        if len(self._cached) > CACHED_GROUPS:
            self._cached.popitem(last=False)
        return rows

    def __getstate__(self) -> dict[str, Any]:  # travels to Ray workers without open files or cached rows
        return {**self.__dict__, "_pid": -1, "_shards": {}, "_cached": OrderedDict()}


def write(source: str, dest: str, rows_per_group: int = ROWS_PER_GROUP, shard_rows: int = 10 * ROWS_PER_GROUP,
          seed: int = 0) -> dict[str, int]:
    """An image folder (train/, test/, val/ of class sub-folders, or class folders alone: workers.data.folders) as
    Parquet shards under `dest`/<split>/shard-NNNNN.parquet, and dest/classes.txt (the class names, label order).
    Each split's rows are written in an order shuffled by `seed`: training shuffles within a row group only, so a
    row group must not hold one class. The files' bytes are kept as they are (not decoded). Returns rows per split."""
    from pathlib import Path

    if rows_per_group < 1 or shard_rows < 1:
        raise SearchsvcError("shards write: --rows-per-group and --shard-rows must be at least 1")
    files = Files(source)
    found = folders_layout(files, seed)
    out = Path(dest).expanduser()
    written = {}
    for name, (keys, labels) in found.files.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
        for shard, start in enumerate(range(0, len(order), shard_rows)):
            rows = order[start:start + shard_rows]
            table = pa.table({"image": pa.array([files.read(keys[i]) for i in rows], pa.binary()),
                              "label": pa.array([labels[i] for i in rows], pa.int64())})
            # Encoded images do not compress further; the labels do.
            pq.write_table(table, out / name / f"shard-{shard:05d}{SUFFIX}", row_group_size=rows_per_group,
                           compression={"image": "none", "label": "zstd"})
        written[name] = len(keys)
    (out / "classes.txt").write_text("".join(f"{name}\n" for name in found.classes))
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.data.shards write SRC DEST`: an image folder as Parquet shards (one line, exit 2, on
    bad input)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m workers.data.shards", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    writing = commands.add_parser("write", help="an image folder (train/ test/ [val/] of class folders) as shards")
    writing.add_argument("source", help="the image folder (a path or s3://bucket/prefix)")
    writing.add_argument("dest", help="the folder the shards are written to (upload it to S3 as it is)")
    writing.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP, help="rows per Parquet row group")
    writing.add_argument("--shard-rows", type=int, default=10 * ROWS_PER_GROUP, help="rows per shard file")
    writing.add_argument("--seed", type=int, default=0, help="seed of the rows' shuffled order")
    args = parser.parse_args(argv)
    try:
        written = write(args.source, args.dest, args.rows_per_group, args.shard_rows, args.seed)
    except SearchsvcError as err:
        print(f"shards: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the destination: not writable, full
        print(f"shards: error: cannot write {err.filename or args.dest}: {err.strerror}", file=sys.stderr)
        return 2
    print(", ".join(f"{name}: {rows} rows" for name, rows in written.items()) + f" written under {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
