"""The training step as one CUDA graph (workers.training.cuda_graph): when it is used, and that it trains as the eager
step does. The replay tests need CUDA (marked gpu: benchmarks/gpu_check.py runs them)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset, normalize
from workers.models.zoo import create_model
from workers.training.cuda_graph import WARMUP_STEPS, GraphedStep
from workers.training.distill import distill_loss_fn, teacher_logits
from workers.training.train import Checkpointer, Recipe, TrainCallback, TrainConfig, _graphable, train_model

DATA = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=2048, test_size=256, image_size=32,
                                                                  channels=3))
CUDA = torch.device("cuda")


class StepWatch(TrainCallback):
    """A callback with a per-step hook that changes nothing on the device, declared so."""

    graph_safe = True

    def __init__(self) -> None:
        self.steps = 0

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None:
        self.steps += 1


def test_only_a_static_step_on_a_gpu_is_graphed():
    static = Recipe(augment=False)
    assert _graphable(CUDA, static, False, [Checkpointer(), StepWatch()])
    assert not _graphable(torch.device("cpu"), static, False, [])
    assert not _graphable(CUDA, Recipe(augment=True), False, [])  # its random crop draws from our own generator
    assert not _graphable(CUDA, static, True, [])  # compiled
    assert not _graphable(CUDA, static, False, [TrainCallback()])  # a callback not declared graph-safe


def test_on_the_cpu_every_epoch_says_it_ran_eagerly():
    splits = load_dataset(DATA)
    history = train_model(create_model("tiny_cnn", 3, 4), splits, Recipe(epochs=1, batch_size=256, augment=False),
                          torch.device("cpu"), progress=False)
    assert history[0]["cuda_graph"] is False


@pytest.fixture
def exact_fp32(monkeypatch):
    """No TF32 and deterministic cuDNN algorithms: eager and replayed kernels compute the same numbers."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)


@pytest.mark.gpu
def test_each_replay_computes_the_eager_loss_and_gradients_of_its_own_batch(exact_fp32):
    splits = load_dataset(DATA).to(CUDA)
    x, y = splits.train
    model = create_model("resnet20", 3, 4).to(CUDA, memory_format=torch.channels_last).train()
    reference = copy.deepcopy(model)  # no optimizer step here: the weights stay equal

    def loss_of(net: nn.Module, index: torch.Tensor) -> torch.Tensor:
        images = normalize(x[index], splits.mean, splits.std).contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(net(images), y[index])

    step = GraphedStep(model, lambda index: loss_of(model, index), 64, CUDA)
    generator = torch.Generator(device=CUDA).manual_seed(0)
    batches = [torch.randperm(len(y), device=CUDA, generator=generator)[:64] for _ in range(WARMUP_STEPS + 3)]
    for index in batches[:WARMUP_STEPS]:  # the warm-up steps run eagerly, as train_model runs them
        model.zero_grad(set_to_none=True)
        loss_of(model, index).backward()
        step.count_eager()
    assert step.ready()
    losses = []
    for index in batches[WARMUP_STEPS:]:
        loss = step.run(index)
        assert loss is not None
        losses.append(loss.item())
        expected = loss_of(reference, index)
        grads = torch.autograd.grad(expected, list(reference.parameters()))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        for p, g in zip(model.parameters(), grads):
            assert torch.linalg.vector_norm(p.grad - g) <= 1e-4 * torch.linalg.vector_norm(g) + 1e-7
    assert step.replays == 3 and len(set(losses)) == 3  # three batches, three losses: not one batch replayed


def kd_run(cuda_graph: bool, callbacks: list[TrainCallback] | None = None) -> tuple[list[dict], nn.Module]:
    splits = load_dataset(DATA).to(CUDA)
    torch.manual_seed(1)
    teacher = create_model("resnet20", 3, 4).to(CUDA, memory_format=torch.channels_last)
    cached = teacher_logits(teacher, splits.train[0], splits.mean, splits.std)
    recipe = TrainConfig(epochs=2, batch_size=128, augment=False)
    student = create_model("resnet20", 3, 4)
    history = train_model(student, splits, recipe, CUDA, seed=3, progress=False, cuda_graph=cuda_graph,
                          loss_fn=distill_loss_fn(recipe.distill, cached=cached), callbacks=callbacks or [])
    return history, student


@pytest.mark.gpu
def test_graphed_training_follows_eager_training(exact_fp32):
    watch = StepWatch()
    graphed, graphed_model = kd_run(True, [watch])
    eager, eager_model = kd_run(False)
    assert [r["cuda_graph"] for r in graphed] == [True, True] and [r["cuda_graph"] for r in eager] == [False, False]
    assert watch.steps == 2 * (len(load_dataset(DATA).train[1]) // 128)  # every step's host-side hook ran
    for g, e in zip(graphed, eager):  # same seed, same batches, same updates (OneCycle's lr and momentum too)
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-2)
        assert abs(g["test_accuracy"] - e["test_accuracy"]) <= 0.02
    for (name, a), b in zip(graphed_model.state_dict().items(), eager_model.state_dict().values()):
        if a.is_floating_point():  # weights and the batch-norm running statistics
            assert torch.linalg.vector_norm(a - b) <= 2e-2 * torch.linalg.vector_norm(b) + 1e-6, name


class Syncing(nn.Module):
    """A network whose forward pass reads a value on the host: no CUDA graph can hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = create_model("tiny_cnn", 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().amax().item() > 1e6:
            x = x.clamp(-1e6, 1e6)
        return self.net(x)


@pytest.mark.gpu
def test_a_model_that_cannot_be_captured_trains_eagerly_and_says_why(caplog):
    splits = load_dataset(DATA).to(CUDA)
    recipe = Recipe(epochs=2, batch_size=256, augment=False)
    with caplog.at_level(logging.WARNING, logger="workers.training.cuda_graph"):
        history = train_model(Syncing(), splits, recipe, CUDA, progress=False)
    assert [r["cuda_graph"] for r in history] == [False, False]
    assert history[-1]["loss"] < history[0]["loss"] and torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert "CUDA graph capture failed, training eagerly" in caplog.text
    # The failed capture left the device usable: the next model is captured and replayed.
    after = train_model(create_model("tiny_cnn", 3, 4), splits, recipe, CUDA, progress=False)
    assert [r["cuda_graph"] for r in after] == [True, True]
