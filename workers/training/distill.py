"""Knowledge distillation: Hinton's soft-target KL (or the N2N paper's logit regression) plus cross-entropy.

Without augmentation the teacher sees the same images every epoch, so its logits for the whole
training split are computed once (`teacher_logits`) and looked up by batch index: no teacher
forward per student step. With augmentation the teacher runs on each augmented batch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from workers.data.datasets import normalize
from workers.data.streaming import Split, batches, device_of
from workers.models.inputs import in_layout
from workers.training.train import DistillConfig, LossFn


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """(1 − α)·CE(student, labels) + α·distillation term.

    kl:     T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean (Hinton et al. 2015; T² keeps
            the gradient scale independent of T);
    logits: mean squared error between the raw logits (Ba & Caruana; the N2N paper's option).
    """
    student, teacher = student.float(), teacher.float()
    hard = F.cross_entropy(student, labels)
    if config.loss == "logits":
        soft = F.mse_loss(student, teacher)
    else:
        t = config.temperature
        soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - config.alpha) * hard + config.alpha * soft


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, split: Split | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                   batch_size: int = 1024) -> torch.Tensor:
    """The teacher's float32 logits for every example of a split (or of uint8 images), in the split's order, on
    its device, in eval mode: row i is example i's (a streamed split's too, read once in order)."""
    teacher.eval()
    if isinstance(split, torch.Tensor):
        split = (split, torch.zeros(len(split), dtype=torch.int64, device=split.device))
    device = device_of(split)
    chunks = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _, images, _ in batches(split, batch_size):
            chunks.append(teacher(in_layout(normalize(images, mean, std), torch.channels_last)).float())
    return torch.cat(chunks)


def inference_copy(teacher: nn.Module, device: torch.device) -> nn.Module:
    """`teacher` ready to run on every training batch: eval mode, channels_last, on `device`. On a GPU it is
    a bf16 copy, cast once: fp32 weights under autocast are cast to bf16 again at every step (a copy of
    the weights per step). On the CPU (no autocast) it is the teacher itself, moved."""
    if device.type != "cuda":
        return teacher.to(device, memory_format=torch.channels_last).eval()
    return copy.deepcopy(teacher).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last).eval()


def distill_loss_fn(config: DistillConfig, cached: torch.Tensor | None = None,
                    teacher: nn.Module | None = None) -> LossFn:
    """A training-loop loss: cached logits looked up by index, else the teacher run on the batch."""
    if cached is None and teacher is None:
        raise ValueError("distill_loss_fn needs cached teacher logits or the teacher")
    if teacher is not None:
        teacher.eval()

    def loss(logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        if cached is not None:
            target = cached[index]
        else:
            with torch.no_grad():
                target = teacher(images)
        return kd_loss(logits, target, labels, config)

    return loss
