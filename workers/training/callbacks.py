"""The hooks of `workers.training.train.train_model`'s loop (Distiller's scheduler interface), and the checkpointing
callback a restarted trial resumes through."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TrainCallback:
    """Hooks into `train_model`'s loop (Distiller's scheduler interface). Epochs count from 0 here.

    before_optimizer_step may veto the step (RigL updates masks instead); on_minibatch_end runs after
    it. A callback with `controls_lr` steps the learning rate itself (from on_train_begin's optimizer):
    train_model then keeps the recipe's lr constant. A `graph_safe` callback's hooks change no tensor the
    step reads and not the loss (host-side work only, or epoch hooks): with it the step may be replayed as
    one CUDA graph (workers.training.cuda_graph); any other callback keeps the step eager.
    """

    controls_lr = False
    graph_safe = False

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int = 0) -> None: ...

    def on_epoch_begin(self, epoch: int) -> None: ...

    def on_minibatch_begin(self, epoch: int, step: int, steps: int) -> None: ...

    def before_backward_pass(self, epoch: int, step: int, steps: int, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def before_optimizer_step(self, epoch: int, step: int, steps: int) -> bool:
        """False skips this step's optimizer.step()."""
        return True

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None: ...

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """`record` is the epoch's history entry (loss, test_accuracy, ...): a callback may add to it."""


class Checkpointer(TrainCallback):
    """A callback that keeps `train_model`'s state after each epoch (`save`) and hands it back when training
    of the same candidate starts again in a new process (`load`): a restarted Tune trial continues from its
    last finished epoch (searchsvc.sweeps.tuner.TrialCheckpoints). The state is plain tensors and numbers (what
    `torch.load(weights_only=True)` reads): the model, optimizer, lr schedule, each callback's `state_dict`,
    the data-order and global random-number states, and the history so far."""

    graph_safe = True  # epoch hooks only

    def load(self) -> dict[str, Any] | None:
        return None

    def save(self, state: dict[str, Any], record: dict[str, Any]) -> None: ...
