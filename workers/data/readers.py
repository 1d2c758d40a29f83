"""Which reader each dataset name has, and how it reads: the synthetic set made here, Fashion-MNIST and CIFAR-10
from their files (workers.data.sources), an image folder or Parquet shards (local or on S3: workers.data.folders,
workers.data.shards; fingerprinted, decoded whole or streamed), the user's own Dataset (workers.data.python_source).
Each reader returns what it found (`sources.Loaded`, or the raw tensors of a source with one shape);
workers.data.datasets splits it and hands it to models.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

from core.errors import SearchsvcError
from workers.data import folders, python_source, shards, sources, streaming

if TYPE_CHECKING:  # the config's module reads through this one
    from workers.data.datasets import DatasetConfig

Raw = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]  # train x, y, test x, y, classes


def _synthetic(config: DatasetConfig) -> Raw:
    syn = config.synthetic
    gen = torch.Generator().manual_seed(config.split_seed + 1)
    # Smooth class prototypes: low-resolution noise upsampled, so convolutions can pick them up.
    low = torch.rand(syn.num_classes, syn.channels, 4, 4, generator=gen)
    protos = torch.nn.functional.interpolate(low, size=syn.image_size, mode="bilinear", align_corners=False)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, syn.num_classes, (count,), generator=gen)
        noise = syn.noise * torch.randn(count, syn.channels, syn.image_size, syn.image_size, generator=gen)
        images = (protos[labels] + noise).clamp(0, 1)
        return (images * 255).round().to(torch.uint8), labels

    train_x, train_y = draw(syn.train_size)
    test_x, test_y = draw(syn.test_size)
    return train_x, train_y, test_x, test_y, syn.num_classes


def _listed(config: DatasetConfig, files: folders.Files) -> str:
    """The fingerprint of the files just listed, checked — before anything is decoded — against the one the run
    started on (`config.fingerprint`, where set)."""
    fingerprint = files.fingerprint()
    if config.fingerprint is not None and fingerprint != config.fingerprint:
        raise SearchsvcError(f"dataset.root: the files at {config.root} are not the data this run started on "
                             f"(fingerprint {fingerprint}, the run's {config.fingerprint}): they changed, or this "
                             f"node sees other files")
    return fingerprint


def _imagefolder(config: DatasetConfig, endpoint: str | None) -> sources.Loaded:
    """An image folder (local or on S3: workers.data.folders) decoded whole, or streamed from its files
    (`in_memory`; auto: by its decoded size)."""
    if config.root is None:
        raise SearchsvcError("dataset.root: imagefolder needs a folder of class sub-folders (a path or s3://)")
    files = folders.Files(config.root, endpoint)
    found = folders.layout(files, config.split_seed)
    fingerprint = _listed(config, files)
    size, skip = config.image_size or 32, config.bad_files == "skip"
    if _streams_images(config, sum(len(keys) for keys, _ in found.files.values()), size):
        return replace(folders.streamed(files, found, size, skip, config.workers), fingerprint=fingerprint)
    return replace(folders.read_all(files, found, size, skip), fingerprint=fingerprint)


def _shards(config: DatasetConfig, endpoint: str | None) -> sources.Loaded:
    """Parquet shards (local or on S3: workers.data.shards) decoded whole, or streamed row group by row group
    (`in_memory`; auto: by their decoded size)."""
    if config.root is None:
        raise SearchsvcError("dataset.root: shards needs a folder or s3://bucket/prefix holding train/*.parquet and "
                             "test/*.parquet")
    files = folders.Files(config.root, endpoint)
    parts = shards.index(files)
    fingerprint = _listed(config, files)
    size, skip = config.image_size or 32, config.bad_files == "skip"
    if _streams_images(config, sum(len(part.labels) for part in parts.values()), size):
        return replace(shards.streamed(files, parts, size, skip, config.workers), fingerprint=fingerprint)
    return replace(shards.read_all(files, parts, size, skip), fingerprint=fingerprint)


def _streams_images(config: DatasetConfig, images: int, size: int) -> bool:
    """Whether `images` RGB images of `size` px a side are streamed (`_streams`); SearchsvcError where they are to
    be decoded whole and do not fit."""
    decoded = images * 3 * size * size  # bytes, uint8
    if _streams(config, decoded):
        return True
    streaming.check_fits(decoded, streaming.available_memory(), "set dataset.in_memory: auto (or false) to stream it")
    return False


def _python(config: DatasetConfig) -> sources.Loaded:
    """The user's dataset (workers.data.python_source) decoded whole, or streamed (`in_memory`)."""
    splits = python_source.call_factory(str(config.factory), config.kwargs)
    if config.in_memory == "auto":
        size = python_source.decoded_bytes(splits)  # None: an iterable split, decoded whole (it cannot stream)
        stream = size is not None and _streams(config, size)
    else:
        stream = not config.in_memory
    if stream:
        return python_source.stream(splits, str(config.factory), config.workers)
    return python_source.decode(splits, str(config.factory))


def _streams(config: DatasetConfig, decoded_bytes: int) -> bool:
    """Whether data of `decoded_bytes` is streamed: as `in_memory` says, or (auto) where it passes its share of the
    memory available here."""
    if config.in_memory != "auto":
        return not config.in_memory
    return decoded_bytes > config.memory_share * streaming.available_memory()


LOADERS: dict[str, Callable[[DatasetConfig, str | None], Raw | sources.Loaded]] = {
    "synthetic": lambda c, _: _synthetic(c),
    "fashion_mnist": lambda c, _: sources.fashion_mnist(c.root, c.download),
    "cifar10": lambda c, _: sources.cifar10(c.root, c.download),
    "imagefolder": _imagefolder,
    "shards": _shards,
    "python": lambda c, _: _python(c),
}
