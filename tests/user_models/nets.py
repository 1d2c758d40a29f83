"""A user's own residual network (not a zoo model): what `teacher.model: tests.user_models.nets:small_resnet`
builds. Written the way people write them: a Sequential stem, blocks with an `if` for the projection."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.project = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.project is None else self.project(x)
        return torch.relu(self.body(x) + skip)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, width, 1), Block(width, 2 * width, 2),
                                    Block(2 * width, 2 * width, 1))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_resnet(in_channels: int = 1, num_classes: int = 4, width: int = 8) -> SmallResNet:
    return SmallResNet(in_channels, num_classes, width)


def broken(**kwargs: object) -> nn.Module:
    raise RuntimeError("this factory cannot build anything")


def plain_cnn(num_classes: int = 4) -> nn.Module:
    """No skip connection anywhere: the N2N agent acts on its single layers (issue 38)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class ScaledCNN(nn.Module):
    """A residual branch scaled by a learned per-channel factor (ConvNeXt's layer scale): a parameter that no
    layer's `reset_parameters` re-initialises, only the constructor."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((8, 1, 1), 1e-6))
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = x + self.gamma * self.branch(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def scaled_cnn(num_classes: int = 4) -> ScaledCNN:
    return ScaledCNN(num_classes)


def mlp(num_classes: int = 4, image_size: int = 16) -> nn.Module:
    """Linear layers only: nothing RigL may sparsify while `ignore_linear_layers` is on."""
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size * image_size, 32), nn.ReLU(), nn.Linear(32, num_classes))


def feature_mlp(features: int = 16, num_classes: int = 4, hidden: int = 32) -> nn.Module:
    """A network on feature vectors [features], not images: two hidden layers whose widths a search may cut."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class TinySegNet(nn.Module):
    """A user's small segmentation network (issue 37): a class per pixel, returned as torchvision's segmentation
    networks return it ({"out": [N, classes, H, W]}); one stride-2 stage and an upsampling back."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.classify = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.classify(self.encode(x))
        return {"out": nn.functional.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def tiny_segnet(num_classes: int = 4, width: int = 16, momentum: float = 0.1) -> TinySegNet:
    """`momentum`: the batch norms' (torchvision's MobileNetV3 uses 0.01)."""
    net = TinySegNet(num_classes, width)
    for norm in net.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = momentum
    return net
