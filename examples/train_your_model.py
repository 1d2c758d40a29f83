"""Stands in for your own trained model: a torchvision ResNet-18 trained on Fashion-MNIST with a plain
PyTorch loop, saved as a state_dict — what `teacher.weights` in configs/your-model-grid.yaml points at.

    python examples/train_your_model.py -o examples/your_resnet18.pt
    searchsvc run configs/your-model-grid.yaml --report report.html

Fashion-MNIST is read from Debian's dataset-fashion-mnist (as `make setup` installs it); nothing is downloaded.
"""

from __future__ import annotations

import argparse

import torch
import torchvision

from workers.data.datasets import DatasetConfig, load_dataset

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel statistics: the normalisation the config states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="examples/your_resnet18.pt", help="where the state_dict goes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=20000, help="training images per epoch")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = load_dataset(DatasetConfig(name="fashion_mnist", channels=3)).train
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=torch.channels_last)
    steps = args.epochs * (args.images // 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=steps)
    model.train()
    for step in range(steps):
        batch = torch.randint(0, len(y), (128,))
        images = (x[batch].float() / 255 - MEAN) / STD
        loss = torch.nn.functional.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    torch.save(model.state_dict(), args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
