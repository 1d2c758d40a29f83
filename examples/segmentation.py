"""Semantic segmentation as your own task (README: "Your own task"): generated images of shapes with a mask of
classes per pixel, and torchvision's LR-ASPP MobileNetV3 built untrained (nothing is downloaded).

    searchsvc run configs/your-task-segmentation.yaml

`shapes` is a dataset factory (`dataset: {name: python, factory: examples.segmentation:shapes}`): each image is a
noisy background with a few shapes; a rectangle is class 1, a disc class 2, a triangle class 3 (0: background),
each drawn in a colour of its own class's hue, later shapes over earlier ones. `lraspp` is the network factory
(`teacher: {model: examples.segmentation:lraspp}`); it returns torchvision's {"out": [N, classes, H, W]}.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

COLOURS = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200]])  # per shape class, jittered per shape


def shapes(train: int = 512, val: int = 128, test: int = 128, size: int = 64, seed: int = 0
           ) -> dict[str, TensorDataset]:
    """The three splits: uint8 images [3, size, size] and int64 masks [size, size] of 4 classes."""
    generator = torch.Generator().manual_seed(seed)
    return {name: TensorDataset(*_draw(count, size, generator)) for name, count in
            (("train", train), ("val", val), ("test", test))}


def _draw(count: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images = (torch.rand(count, 3, 1, 1, generator=generator) * 80 + 20).expand(count, 3, size, size).clone()
    images += torch.randn(count, 3, size, size, generator=generator) * 12
    masks = torch.zeros(count, size, size, dtype=torch.int64)
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for _ in range(3):  # shapes per image
        kind = torch.randint(1, 4, (count,), generator=generator)
        cy, cx = (torch.rand(2, count, generator=generator) * size).view(2, count, 1, 1)
        radius = (torch.rand(count, generator=generator) * size / 5 + size / 10).view(count, 1, 1)
        rectangle = ((y - cy).abs() < radius * 0.8) & ((x - cx).abs() < radius * 1.2)
        disc = (y - cy) ** 2 + (x - cx) ** 2 < radius ** 2
        triangle = (y > cy - radius) & (y < cy + radius) & ((x - cx).abs() < (y - cy + radius) / 2)
        k = kind.view(count, 1, 1)
        inside = torch.where(k == 1, rectangle, torch.where(k == 2, disc, triangle))
        colour = COLOURS[kind - 1].float() + torch.randn(count, 3, generator=generator) * 20
        images = torch.where(inside.unsqueeze(1), colour.view(count, 3, 1, 1), images)
        masks = torch.where(inside, k, masks)
    return images.clamp(0, 255).to(torch.uint8), masks


def lraspp(num_classes: int = 4) -> nn.Module:
    """torchvision's LR-ASPP MobileNetV3-Large, untrained (weights=None: no download)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
