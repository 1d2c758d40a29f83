"""A small student's training step replayed as one CUDA graph.

Why: a ResNet-20 step at batch 512 is about 300 small kernels; launched one by one from Python they take
half of the step (H100: 9.5 ms eager, 4.9 ms as one graph, `benchmarks/packing_probe.py --graph`). A graph
launches them all at once. What is captured: the batch's gather from the resident training split by a
static index tensor, normalisation, the forward pass under bf16 autocast, the loss and the backward pass,
which writes each parameter's `.grad` in place. What stays eager: the optimizer step and the learning-rate
schedule (OneCycleLR also cycles momentum, a Python float a graph would freeze), and every callback hook.

A step is graphed only when it is static: on a GPU, no augmentation (its random crop draws from a generator
of our own), not compiled, and every callback `graph_safe` (its hooks change no tensor the step reads and
not the loss). Anything else — a user's model that synchronises in its forward pass, say — fails the
capture, which is logged once; training goes on eagerly, losing nothing (a capture runs no kernel).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps before the capture: cuDNN autotuning, momentum buffers, lazy initialisation
# One capture at a time in a process: `torch.cuda.graph` synchronises the whole device before it captures,
# which breaks another thread's capture under way (seen on an H100: four threads training at once, both
# captures failed). Other threads' device-wide syncs during a capture stay unsafe: a worker trains one
# candidate at a time (EvalContext.device_lock).
_CAPTURE_LOCK = threading.Lock()


class GraphedStep:
    """Forward, loss and backward of one batch, captured once after `WARMUP_STEPS` eager steps, replayed after.

    `forward_loss(index)` computes the loss of the batch at `index` (rows of the resident training split);
    it must read the batch through `index` alone, so that a replay with new indices trains a new batch.
    """

    def __init__(self, model: nn.Module, forward_loss: Callable[[torch.Tensor], torch.Tensor], batch: int,
                 device: torch.device) -> None:
        self.model, self.forward_loss = model, forward_loss
        self.index = torch.zeros(batch, dtype=torch.int64, device=device)  # the graph's input: its address is fixed
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss: torch.Tensor | None = None  # the graph's output, overwritten by each replay
        self.eager_steps = self.replays = 0
        self.failed: str | None = None  # why the capture failed: eager from then on

    @property
    def active(self) -> bool:
        """True while the caller should hand steps here (not yet failed)."""
        return self.failed is None

    def ready(self) -> bool:
        """True once warmed up: the next step is captured (or replayed)."""
        return self.active and self.eager_steps >= WARMUP_STEPS

    def count_eager(self) -> None:
        """The caller ran one warm-up step eagerly."""
        self.eager_steps += 1

    def run(self, index: torch.Tensor) -> torch.Tensor | None:
        """Loss of the batch at `index` (a device tensor, valid until the next call), gradients in `.grad`;
        None when the capture failed: run this step eagerly."""
        self.index.copy_(index)
        if self.graph is None and not self._capture():
            return None
        assert self.graph is not None and self.loss is not None
        self.graph.replay()
        self.replays += 1
        return self.loss.detach()

    def _capture(self) -> bool:
        # The gradients must not exist at capture: the captured backward then allocates them from the graph's
        # memory pool and every replay writes them there (the optimizer reads them in place). Never set them
        # to None afterwards.
        for p in self.model.parameters():
            p.grad = None
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
        try:
            # thread_local: the store writer thread may touch CUDA while this thread captures.
            with _CAPTURE_LOCK, torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss = self.forward_loss(self.index)
                loss.backward()
        except Exception as err:  # noqa: BLE001 — any capture failure means this model runs eagerly
            torch.cuda.set_stream(stream)  # a capture that fails to end leaves its own stream current
            self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            log.warning("CUDA graph capture failed, training eagerly: %s", self.failed)
            for p in self.model.parameters():
                p.grad = None
            return False
        self.graph, self.loss = graph, loss.detach()
        return True
