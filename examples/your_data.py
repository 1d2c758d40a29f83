"""Your own data, as searchsvc reads it from your code: `dataset: {name: python, factory: examples.your_data:csv_images,
kwargs: {root: ...}}`. Here: a folder of PNG or JPEG files with one CSV of labels per split, the layout many
labelling tools export —

    root/train.csv   file,label           (file relative to root, label an integer class)
    root/val.csv     the validation split  (optional: without it searchsvc carves val_fraction of train)
    root/test.csv
    root/images/...

Each split is a map-style `torch.utils.data.Dataset` of (image, class): with `dataset.in_memory: false` (or `auto`
on data larger than its memory share) searchsvc reads it batch by batch through DataLoader workers, so it is
decoded in `__getitem__`, one file at a time. `python examples/make_your_data.py -o DIR` writes such a folder from
Fashion-MNIST.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class CsvImages(Dataset):
    """One split: the files a CSV names, each decoded to uint8 [C, size, size] when read (C: 1 for grayscale)."""

    def __init__(self, root: Path, table: Path, size: int, grayscale: bool) -> None:
        with open(table, newline="") as handle:
            rows = list(csv.DictReader(handle))
        self.files = [root / row["file"] for row in rows]
        self.targets = [int(row["label"]) for row in rows]  # searchsvc reads them here instead of decoding
        self.size, self.mode = size, "L" if grayscale else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            pixels = np.asarray(image.convert(self.mode).resize((self.size, self.size), Image.BILINEAR))
        tensor = torch.from_numpy(pixels.copy())
        return (tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)), self.targets[index]


def csv_images(root: str, size: int = 28, grayscale: bool = True) -> dict[str, Dataset]:
    """The splits of `root` (train.csv, test.csv and, if present, val.csv)."""
    base = Path(root).expanduser()
    names = [name for name in ("train", "val", "test") if (base / f"{name}.csv").is_file()]
    if "train" not in names or "test" not in names:
        raise FileNotFoundError(f"{base}: expected train.csv and test.csv (and val.csv if you have one)")
    return {name: CsvImages(base, base / f"{name}.csv", size, grayscale) for name in names}
