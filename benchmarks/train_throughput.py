"""Training throughput of the step loop (images/s), channels_last on vs off, on this machine's device.

    python benchmarks/train_throughput.py [--arch resnet20] [--steps 20] [--out benchmarks/results]

Both layouts run in the same process on the same synthetic batch, so the ratio is the figure to
read (absolute numbers move with the machine's load).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import write_result

from workers.models.zoo import create_model
from workers.training.train import resolve_device


def images_per_second(arch: str, channels_last: bool, device: torch.device, batch: int, size: int, channels: int,
                      steps: int, warmup: int = 3) -> float:
    """Forward + backward + SGD step on a fixed random batch; images/s over `steps` after `warmup`."""
    torch.manual_seed(0)
    model = create_model(arch, channels, 10).to(device)
    images = torch.randn(batch, channels, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet20", help="registered model name (default resnet20)")
    parser.add_argument("--batch", type=int, default=256, help="images per step (default 256)")
    parser.add_argument("--size", type=int, default=28, help="image height = width in pixels (default 28)")
    parser.add_argument("--channels", type=int, default=1, help="image channels (default 1: Fashion-MNIST)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layout (default 20)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    device = resolve_device(args.device)
    shape = dict(batch=args.batch, size=args.size, channels=args.channels, steps=args.steps)
    fast = images_per_second(args.arch, True, device, **shape)
    plain = images_per_second(args.arch, False, device, **shape)
    result = {"benchmark": "train_throughput", "arch": args.arch, **shape, "device": str(device),
              "threads": torch.get_num_threads(), "channels_last_images_per_s": round(fast, 1),
              "contiguous_images_per_s": round(plain, 1), "channels_last_speedup": round(fast / plain, 3)}
    path = write_result(args.out, "train_throughput", result)
    print(f"{args.arch} on {device}: channels_last {fast:.0f} img/s, contiguous {plain:.0f} img/s, "
          f"ratio {fast / plain:.2f}x  → {path}")


if __name__ == "__main__":
    main()
