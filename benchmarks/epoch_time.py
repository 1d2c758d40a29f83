"""One epoch of distillation (ResNet-18 student from a ResNet-18 teacher, CIFAR-10 shape) on this device:
the worker's training loop against a plain PyTorch loop, in the same process.

    python benchmarks/epoch_time.py [--images 50000] [--batch 512] [--cached] [--compile] [--out benchmarks/results]

ours:  `workers.training.train.train_model` as a candidate evaluation runs it: the split resident on the device,
       augmentation (random crop + flip) batched on the device, channels_last, bf16 autocast on a GPU,
       the teacher (a bf16 copy on a GPU) run on each augmented batch, no host sync inside the epoch.
       With --cached: no augmentation, the teacher's logits computed once and looked up per batch (the
       n2n configs' setting); the plain loops then do the same.
plain: the textbook loop: a DataLoader over the uint8 images with per-image torchvision transforms in
       worker processes, `loss.item()` every step, in two precisions:
       - matched: the same precision and layout as ours (bf16 autocast on a GPU, channels_last), so the
         ratio plain_matched/ours measures the loop alone (data on the device, no host syncs);
       - fp32: fp32 and NCHW as well, today's most common loop (the ratio mixes loop and precision).
Each loop trains two epochs; the second is timed (the first pays for cuDNN autotuning and compilation;
with --compile the difference of the two is reported as `compile_s`). The figure to read is
plain_matched/ours (`speedup_loop_only`). Achieved TFLOP/s counts the student's forward and backward
(3 x forward) plus, when live, the teacher's forward, at 2 FLOPs per multiply-accumulate; the fraction of the
device's dense bf16 peak is given for the GPUs in `BF16_PEAK_TFLOPS`. Images are synthetic (their
content does not change the speed), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from common import cifar_shaped, write_result
from torch.utils.data import DataLoader, Dataset

from workers.data.datasets import Splits, load_dataset
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec
from workers.models.zoo import create_model
from workers.training.distill import distill_loss_fn, inference_copy, kd_loss, teacher_logits
from workers.training.train import DistillConfig, TrainConfig, resolve_device, train_model

# Dense bf16 tensor-core peak in TFLOP/s (vendor data sheets), matched against torch's device name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "A100": 312.0,
                    "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def ours(student: torch.nn.Module, teacher: torch.nn.Module, splits: Splits, batch: int, device: torch.device,
         compile_model: bool, live: bool) -> tuple[float, float]:
    """Seconds of the (first, second) epoch of `train_model` as a worker runs it: `live`, the teacher (a bf16
    copy on a GPU) on each augmented batch; else no augmentation and the teacher's logits computed once."""
    recipe = TrainConfig(epochs=2, batch_size=batch, augment=live)
    if live:
        loss_fn = distill_loss_fn(recipe.distill, teacher=inference_copy(teacher, device))
    else:
        teacher = teacher.to(device, memory_format=torch.channels_last)
        loss_fn = distill_loss_fn(recipe.distill, cached=teacher_logits(teacher, splits.train[0].to(device),
                                                                         splits.mean, splits.std))
    history = train_model(student, splits, recipe, device, progress=False, loss_fn=loss_fn,
                          compile_model=compile_model)
    return history[0]["seconds"], history[1]["seconds"]


class TrainImages(Dataset):
    """Per-image float conversion and normalisation, with random crop (padding 4) + horizontal flip when
    `augment` (the torchvision recipe); yields (image, label, index)."""

    def __init__(self, splits: Splits, augment: bool) -> None:
        from torchvision.transforms import v2

        self.images, self.labels = splits.train
        size = self.images.shape[-1]
        steps = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if augment else []
        self.transform = v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(splits.mean,
                                                                                                  splits.std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.transform(self.images[i]), self.labels[i], i


def plain(student: torch.nn.Module, teacher: torch.nn.Module, splits: Splits, batch: int, device: torch.device,
          workers: int, matched: bool, live: bool) -> float:
    """Seconds of the second epoch of a plain DataLoader loop (a host sync every step); `matched`: bf16
    autocast on a GPU and channels_last like ours, else fp32 and NCHW. `live`: augmented batches through
    the fp32 teacher every step, else no augmentation and logits computed once (looked up by index)."""
    layout = torch.channels_last if matched else torch.contiguous_format
    student = student.to(device, memory_format=layout).train()
    teacher = teacher.to(device, memory_format=layout).eval()
    autocast = matched and device.type == "cuda"
    cached = None if live else teacher_logits(teacher, splits.train[0].to(device), splits.mean, splits.std)
    config = DistillConfig()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loader = DataLoader(TrainImages(splits, augment=live), batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    seconds = 0.0
    for _ in range(2):
        sync(device)
        started = time.perf_counter()
        total = 0.0
        for images, labels, index in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                if cached is None:
                    with torch.no_grad():
                        target = teacher(images)
                else:
                    target = cached[index.to(device)]
                loss = kd_loss(student(images), target, labels, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        sync(device)
        seconds = time.perf_counter() - started
    return seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kd_epoch(arch: str, images: int, batch: int, device: torch.device, workers: int, live: bool,
             compile_model: bool = False, plain_loops: bool = True) -> dict[str, Any]:
    """One KD epoch of `arch` from `arch` on `images` CIFAR-shaped images: ours, then (`plain_loops`) the plain
    loop matched and in fp32, each from the same initial weights; seconds, images/s, TFLOP/s, peak share."""
    splits = load_dataset(cifar_shaped(images, val_fraction=0.0))
    torch.manual_seed(0)
    teacher, student = create_model(arch, 3, 10), create_model(arch, 3, 10)
    start_state = {k: v.clone() for k, v in student.state_dict().items()}
    first_s, ours_s = ours(student, teacher, splits, batch, device, compile_model, live)
    trained = (images // batch) * batch  # both loops drop the ragged last batch
    macs = count_macs(create_model(arch, 3, 10), InputSpec.image(3, 32))
    flops_per_image = 2 * (3 * macs + (macs if live else 0))  # student forward + backward (+ live teacher forward)
    tflops = flops_per_image * trained / ours_s / 1e12
    peak = bf16_peak(device)
    result = {"arch": arch, "images": images, "batch": batch, "device": str(device), "teacher": "live" if live
              else "cached logits", "compile": compile_model, "threads": torch.get_num_threads(),
              "ours_epoch_s": round(ours_s, 3), "ours_images_per_s": round(trained / ours_s, 1),
              "compile_s": round(first_s - ours_s, 3) if compile_model else None,
              "ours_epoch_s_at_50k": round(ours_s * 50_000 / trained, 3),
              "gflops_per_image": round(flops_per_image / 1e9, 3), "achieved_tflops": float(f"{tflops:.4g}"),
              "bf16_peak_tflops": peak, "fraction_of_peak": float(f"{tflops / peak:.4g}") if peak else None}
    if not plain_loops:
        return result
    student.load_state_dict(start_state)
    matched_s = plain(student, teacher, splits, batch, device, workers, matched=True, live=live)
    student.load_state_dict(start_state)
    plain_s = plain(student, teacher, splits, batch, device, workers, matched=False, live=live)
    return {**result, "dataloader_workers": workers,
            "plain_matched_epoch_s": round(matched_s, 3), "plain_matched_images_per_s": round(trained / matched_s, 1),
            "speedup_loop_only": round(matched_s / ours_s, 3),
            "plain_epoch_s": round(plain_s, 3), "plain_images_per_s": round(trained / plain_s, 1),
            "speedup_vs_plain": round(plain_s / ours_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18_cifar", help="student and teacher model (default resnet18_cifar)")
    parser.add_argument("--images", type=int, default=None,
                        help="images per epoch (default 50000 on a GPU, 256 on the CPU, where 50k takes hours)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 512 on a GPU, 64 on the CPU)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes of the plain loop (default: the cores, at most 8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our training step")
    parser.add_argument("--cached", action="store_true",
                        help="no augmentation, the teacher's logits computed once (default: live teacher, augmented)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    images = args.images or (50_000 if on_gpu else 256)
    batch = args.batch or (512 if on_gpu else 64)
    torch.backends.cudnn.benchmark = True  # both loops: fixed shapes
    figures = kd_epoch(args.arch, images, batch, device, args.workers, live=not args.cached, compile_model=args.compile)
    result = {"benchmark": "epoch_time", **figures}
    name = f"epoch_time_{device.type}{'_cached' if args.cached else ''}{'_compile' if args.compile else ''}"
    path = write_result(args.out, name, result)
    print(f"{args.arch} KD epoch ({result['teacher']}) on {device}: ours {result['ours_epoch_s']:.2f} s "
          f"({result['ours_images_per_s']:.0f} img/s, {result['achieved_tflops']:.2f} TFLOP/s), plain (same precision "
          f"and layout) {result['plain_matched_epoch_s']:.2f} s: {result['speedup_loop_only']:.2f}x; plain fp32 NCHW "
          f"{result['plain_epoch_s']:.2f} s: {result['speedup_vs_plain']:.2f}x  → {path}")

if __name__ == "__main__":
    main()
