"""Splits too large for memory, read batch by batch (`dataset.in_memory: false`, or `auto` when the decoded data
passes its share of memory).

A streamed split is a map-style Dataset of (input, target) pairs — an image folder's files decoded and resized on
demand, or the user's own dataset — read through a `torch.utils.data.DataLoader`: `workers` background processes
decode the batches of a given order (the same order the resident path takes), pinned memory on a GPU, each batch
moved to the device while the previous one trains (`prefetch` batches ahead per worker). Memory is bounded by the
batch and the prefetch depth, not the dataset. Why DataLoader workers and not Ray Data: the order of a split's
examples must be the training loop's own (the teacher's cached logits are looked up by example index, and a
resumed trial must see the batches it would have seen), each evaluation worker already is a Ray actor with its
CPUs, and a DataLoader needs no second scheduler inside it (benchmarks/data_scale.py measures it).

Every function here also takes a resident split, the (inputs, targets) tensors of the in-memory path, so callers
need not know which one they hold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from core.errors import SearchsvcError

Resident = tuple[torch.Tensor, torch.Tensor]  # inputs [N, ...] (uint8 images or float), targets [N] int64
MEMORY_SHARE = 0.5  # of the memory available that data decoded whole may take: the rest is the models', Ray's, the OS's


def available_memory() -> int:
    """Bytes of memory available now (Linux's MemAvailable; where there is none, the pages not in use)."""
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024  # kB
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(needed: int, available: int, hint: str) -> None:
    """SearchsvcError (one line, before memory runs out) if data of `needed` bytes decoded whole passes
    MEMORY_SHARE of the `available` bytes; `hint` says what to do instead."""
    if needed > MEMORY_SHARE * available:
        raise SearchsvcError(f"dataset: the decoded data takes {needed / 2**30:.1f} GiB, more than "
                             f"{MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB of memory available; {hint}")


@dataclass(frozen=True, eq=False)  # compared by identity: its fields hold a dataset and a tensor
class Streamed:
    """A split read from its source batch by batch: `dataset[i]` is (input tensor, target int); `labels` are every
    example's target, known up front (class counts, accuracy); `shape` and `dtype` one input's."""

    dataset: Dataset
    labels: torch.Tensor  # [N] int64, on the CPU
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")  # where its batches are delivered
    workers: int = 2  # DataLoader processes decoding batches (0: in the reading process)
    prefetch: int = 2  # batches each worker decodes ahead
    # [N] int64, non-decreasing: the block each example is read with (a Parquet row group: reading one example
    # reads its block); None where examples are read one by one. `epoch_order` keeps a block's examples together.
    blocks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> Streamed:
        return replace(self, device=torch.device(device))

    def subset(self, index: torch.Tensor) -> Streamed:
        """The examples at `index` (a split carved from another, or a subset), in that order, each with its block
        (a split read in blocks is best cut in storage order: workers.data.datasets.STORAGE_ORDER)."""
        return replace(self, dataset=torch.utils.data.Subset(self.dataset, index.tolist()),
                       labels=self.labels[index].clone(),
                       blocks=None if self.blocks is None else self.blocks[index].clone())

    def nbytes(self) -> int:
        """What the split would take decoded in memory, bytes."""
        return len(self) * math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


Split = Resident | Streamed


def count(split: Split) -> int:
    """Examples in the split."""
    return len(split) if isinstance(split, Streamed) else len(split[1])


def input_shape(split: Split) -> tuple[int, ...]:
    """One example's input shape ([C, H, W] for images)."""
    return split.shape if isinstance(split, Streamed) else tuple(split[0].shape[1:])


def device_of(split: Split) -> torch.device:
    return split.device if isinstance(split, Streamed) else split[0].device


def epoch_order(split: Split, generator: torch.Generator, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """A random order of the split's examples from `generator` (an epoch's, a calibration sample's), on `device`
    (default: the generator's): `torch.randperm`, except for a split read in blocks, whose blocks come in a random
    order, each block's examples shuffled within it — each block is then read once per pass (per DataLoader
    worker), not once per example."""
    device = torch.device(device) if device is not None else generator.device
    n = count(split)
    blocks = split.blocks if isinstance(split, Streamed) else None
    if blocks is None:
        return torch.randperm(n, generator=generator, device=device)
    block_id = torch.unique(blocks, return_inverse=True)[1].to(device)  # 0 .. blocks - 1
    rank = torch.randperm(int(block_id.max()) + 1 if n else 0, generator=generator, device=device)
    # A block's rank plus a uniform draw in [0, 1): sorted, the blocks in rank order, each one's examples shuffled.
    score = rank[block_id].double() + torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return torch.sort(score, stable=True).indices


def batches(split: Split, batch_size: int, order: torch.Tensor | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(index, inputs, targets) of consecutive batches of `order` (default: the split's own order), on the split's
    device; the last batch may be short. A resident split is indexed on its device, no copy of the rest; a
    streamed one is decoded by its DataLoader a batch or more ahead."""
    device = device_of(split)
    if order is None:
        order = torch.arange(count(split), device=device)
    if not isinstance(split, Streamed):
        images, labels = split
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            yield index, images[index], labels[index]
        return
    chunks = [chunk.tolist() for chunk in order.cpu().split(batch_size)]
    cuda = device.type == "cuda"
    try:
        for index, inputs, targets in _loader(split, chunks):
            yield (index.to(device, non_blocking=cuda), inputs.to(device, non_blocking=cuda),
                   targets.to(device, non_blocking=cuda))
    except SearchsvcError as err:  # from a DataLoader worker: its message carries the worker's traceback
        raise SearchsvcError(str(err).strip().splitlines()[-1].split("SearchsvcError: ", 1)[-1]) from None


def index_batches(split: Split, batch_size: int, order: torch.Tensor
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """As `batches`, but a resident split's inputs and targets are left to the caller to index (None): the
    training loop indexes them itself, or a CUDA graph reads them through the index."""
    if isinstance(split, Streamed):
        yield from batches(split, batch_size, order)
        return
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size], None, None


def take(split: Split, index: torch.Tensor) -> Resident:
    """The examples at `index` as resident tensors on the split's device (a few batches: calibration, probes)."""
    if not isinstance(split, Streamed):
        return split[0][index.to(split[0].device)], split[1][index.to(split[1].device)]
    parts = [(x, y) for _, x, y in batches(split, 256, index)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _loader(split: Streamed, chunks: Sequence[list[int]]) -> DataLoader:
    """A DataLoader over `split` yielding (index, inputs, targets) for each chunk of example indices, in order."""
    return DataLoader(_Indexed(split.dataset), batch_sampler=chunks, num_workers=split.workers,
                      pin_memory=split.device.type == "cuda", collate_fn=_collate,
                      prefetch_factor=split.prefetch if split.workers else None,
                      persistent_workers=False, multiprocessing_context="fork" if split.workers else None)


class _Indexed(Dataset):
    """(index, input, target) of the wrapped dataset: the loop needs each example's index (cached logits)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        x, y = self.dataset[index]
        return index, x, y


def _collate(items: list[tuple[int, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    index, inputs, targets = zip(*items)
    return (torch.tensor(index, dtype=torch.int64), torch.stack(inputs),
            torch.tensor(targets, dtype=torch.int64))


class Converted(Dataset):
    """The user's map-style dataset with each example checked and converted as the in-memory reader does it."""

    def __init__(self, dataset: Dataset, split: str, convert: Callable[[Any, str, int], tuple[torch.Tensor, int]]
                 ) -> None:
        self.dataset, self.split, self.convert = dataset, split, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.convert(self.dataset[index], self.split, index)
