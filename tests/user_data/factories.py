"""Datasets from the user's code (`dataset: {name: python, factory: tests.user_data.factories:NAME}`): the kinds a
user brings (map-style, iterable, PIL images, inputs their transform normalised) and the mistakes they make."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset


def _patterns(count: int, classes: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable uint8 images: a smooth pattern per class plus noise (as the synthetic set makes them)."""
    gen = torch.Generator().manual_seed(1234)  # the same class patterns in every split
    protos = torch.nn.functional.interpolate(torch.rand(classes, channels, 4, 4, generator=gen), size=size,
                                             mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=gen)
    images = (protos[labels] + 0.3 * torch.randn(count, channels, size, size, generator=gen)).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def images(train: int = 512, val: int = 128, test: int = 128, classes: int = 4, channels: int = 1,
           size: int = 16) -> dict[str, Dataset]:
    """Map-style uint8 image datasets with their own validation split (`val: 0`: none, carved from train)."""
    splits = {"train": TensorDataset(*_patterns(train, classes, channels, size, 1)),
              "test": TensorDataset(*_patterns(test, classes, channels, size, 3))}
    if val:
        splits["val"] = TensorDataset(*_patterns(val, classes, channels, size, 2))
    return splits


class Normalised(IterableDataset):
    """An iterable dataset whose inputs the user's own transform normalised (float32, mean 0, std 1)."""

    def __init__(self, count: int, seed: int, size: int = 16) -> None:
        self.x, self.y = _patterns(count, 4, 3, size, seed)

    def __iter__(self):
        for x, y in zip(self.x, self.y):
            yield (x.float() / 255 - 0.5) / 0.25, int(y)


def normalised(train: int = 400, test: int = 100) -> dict[str, Dataset]:
    return {"train": Normalised(train, 1), "test": Normalised(test, 3)}


class Pil(Dataset):
    """PIL images (H x W x C) with numpy integer targets, as torchvision-style datasets return them."""

    def __init__(self, count: int, seed: int) -> None:
        self.x, self.y = _patterns(count, 3, 3, 12, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.fromarray(self.x[index].permute(1, 2, 0).numpy()), np.int64(self.y[index])


def pil(train: int = 96, test: int = 32) -> dict[str, Dataset]:
    return {"train": Pil(train, 1), "test": Pil(test, 3)}


# ---- mistakes ---------------------------------------------------------------------------------------------------

def raises() -> dict:
    raise FileNotFoundError("/data/mine: no such folder")


def a_list() -> list:
    return [TensorDataset(*_patterns(8, 2, 1, 8, 1))]


def no_test() -> dict:
    return {"train": TensorDataset(*_patterns(8, 2, 1, 8, 1))}


def a_count() -> dict:
    return {"train": 1000, "test": 100}


def empty_test() -> dict:
    return {"train": TensorDataset(*_patterns(8, 2, 1, 8, 1)), "test": TensorDataset(*_patterns(0, 2, 1, 8, 1))}


def negative_target() -> dict:
    x, y = _patterns(8, 2, 1, 8, 1)
    return {"train": TensorDataset(x, y - 1), "test": TensorDataset(x, y)}


def with_nan() -> dict:
    x = torch.zeros(8, 1, 8, 8)
    x[5, 0, 2, 2] = float("nan")
    return {"train": TensorDataset(x, torch.zeros(8, dtype=torch.int64)), "test": TensorDataset(x[:2], torch.zeros(2, dtype=torch.int64))}


def mixed_shapes() -> dict:
    return {"train": TensorDataset(*_patterns(8, 2, 1, 8, 1)), "test": TensorDataset(*_patterns(4, 2, 1, 10, 3))}


def exits() -> dict:
    sys.exit(0)


def broken_item() -> dict:
    class Broken(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            raise OSError(f"image {index}.jpg is truncated")

    return {"train": Broken(), "test": Broken()}


# ---- inputs that are not square images --------------------------------------------------------------------------

def features(train: int = 384, val: int = 96, test: int = 96, size: int = 16, classes: int = 4) -> dict[str, Dataset]:
    """Float feature vectors [size] (tabular data, embeddings): a class's mean vector plus noise."""
    means = torch.randn(classes, size, generator=torch.Generator().manual_seed(99))

    def split(count: int, seed: int) -> TensorDataset:
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, classes, (count,), generator=gen)
        return TensorDataset(means[labels] + 0.8 * torch.randn(count, size, generator=gen), labels)

    return {"train": split(train, 1), "val": split(val, 2), "test": split(test, 3)}


def wide_images(train: int = 256, test: int = 64, height: int = 12, width: int = 20) -> dict[str, Dataset]:
    """uint8 RGB images wider than they are high: a class's pattern plus noise."""
    def split(count: int, seed: int) -> TensorDataset:
        x, y = _patterns(count, 3, 3, width, seed)
        return TensorDataset(x[:, :, :height].contiguous(), y)

    return {"train": split(train, 1), "test": split(test, 3)}


def uint8_vectors() -> dict:
    x = torch.zeros(8, 16, dtype=torch.uint8)  # a vector of bytes, not an image
    y = torch.zeros(8, dtype=torch.int64)
    return {"train": TensorDataset(x, y), "test": TensorDataset(x[:2], y[:2])}
