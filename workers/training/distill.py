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

from core.errors import SearchsvcError
from workers.data.datasets import Splits, normalize
from workers.data.streaming import Split, available_memory, batches, count, device_of
from workers.models.inputs import in_layout
from workers.training.task import Outputs, Task, output_tensors, prediction
from workers.training.train import DistillConfig, LossFn


def kd_loss(student: Outputs, teacher: Outputs, labels: torch.Tensor, config: DistillConfig,
            task: Task | None = None) -> torch.Tensor:
    """(1 − α)·the task's loss (cross-entropy by default) + α·distillation term.

    kl:     T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the class axis (dim 1), mean over the batch and,
            for dense outputs ([N, C, H, W]), over every position (Hinton et al. 2015; T² keeps the gradient
            scale independent of T);
    logits: mean squared error between the raw outputs (Ba & Caruana; the N2N paper's option).
    The student matches the teacher's prediction, or with `task.distill_on: outputs` every output tensor they
    share (`teacher` may be the cached prediction alone: then the prediction).
    """
    task = task or Task()
    hard = task.loss(_float(student), labels)
    pairs = matched_outputs(student, teacher, task)
    soft = sum(_soft(s.float(), t.float(), config) for s, t in pairs) / len(pairs)
    return (1.0 - config.alpha) * hard + config.alpha * soft


def matched_outputs(student: Outputs, teacher: Outputs, task: Task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) tensor pairs distillation matches; SearchsvcError naming task.distill_on if the shapes
    cannot be matched."""
    if task.config.distill_on == "outputs" and not isinstance(teacher, torch.Tensor):
        mine, theirs = output_tensors(student), output_tensors(teacher)
        pairs = [(mine[k], theirs[k]) for k in mine if k in theirs]
    else:
        pairs = [(task.predict(student), teacher if isinstance(teacher, torch.Tensor) else task.predict(teacher))]
    for s, t in pairs:
        if s.shape != t.shape:
            raise SearchsvcError(f"task.distill_on: the student's output {tuple(s.shape)} cannot be matched to the "
                                 f"teacher's {tuple(t.shape)}; both must give the same shape")
    if not pairs:
        raise SearchsvcError("task.distill_on: outputs — the student and the teacher share no output")
    return pairs


def _float(outputs: Outputs) -> Outputs:
    """The outputs in float32 (bf16 logits under autocast: the loss is taken in full precision)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    if isinstance(outputs, dict):
        return {k: _float(v) for k, v in outputs.items()}
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_float(v) for v in outputs)
    return outputs


def _soft(student: torch.Tensor, teacher: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    if config.loss == "logits":
        return F.mse_loss(student, teacher)
    t = config.temperature
    if student.ndim <= 2:
        return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
    positions = student.numel() // student.shape[1]  # batch x every spatial position
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="sum", log_target=True) / positions * (t * t)


@torch.inference_mode()
def teacher_logits(teacher: nn.Module, split: Split | torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                   batch_size: int = 1024, output: str | int | None = None) -> torch.Tensor:
    """The teacher's float32 logits (its prediction: `task.output` of a dict or tuple) for every example of a
    split (or of uint8 images), in the split's order, on its device, in eval mode: row i is example i's (a
    streamed split's too, read once in order)."""
    teacher.eval()
    if isinstance(split, torch.Tensor):
        split = (split, torch.zeros(len(split), dtype=torch.int64, device=split.device))
    device = device_of(split)
    chunks = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for _, images, _ in batches(split, batch_size):
            outputs = teacher(in_layout(normalize(images, mean, std), torch.channels_last))
            chunks.append(prediction(outputs, output).float())
    return torch.cat(chunks)


CACHE_SHARE = 0.25  # of the memory available: the most the teacher's cached outputs for the training split may take


@torch.inference_mode()
def cache_fits(teacher: nn.Module, splits: Splits, output: str | int | None = None) -> bool:
    """Whether the teacher's prediction for every training example fits CACHE_SHARE of the memory available: a
    class vector always does; a mask of logits per pixel (segmentation) may not, and then the teacher runs live."""
    teacher.eval()
    example = splits.inputs.example(teacher)
    per_example = prediction(teacher(example), output).numel() * 4  # float32
    return count(splits.train) * per_example <= CACHE_SHARE * available_memory()


def inference_copy(teacher: nn.Module, device: torch.device) -> nn.Module:
    """`teacher` ready to run on every training batch: eval mode, channels_last, on `device`. On a GPU it is
    a bf16 copy, cast once: fp32 weights under autocast are cast to bf16 again at every step (a copy of
    the weights per step). On the CPU (no autocast) it is the teacher itself, moved."""
    if device.type != "cuda":
        return teacher.to(device, memory_format=torch.channels_last).eval()
    return copy.deepcopy(teacher).to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last).eval()


def distill_loss_fn(config: DistillConfig, cached: torch.Tensor | None = None,
                    teacher: nn.Module | None = None, task: Task | None = None) -> LossFn:
    """A training-loop loss: cached logits looked up by index, else the teacher run on the batch (its every output:
    what `task.distill_on: outputs` matches)."""
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
        return kd_loss(logits, target, labels, config, task)

    return loss
