"""RigL dynamic sparse training (Evci et al., "Rigging the Lottery", 2020), with rigl-torch's interface:

    scheduler = RigLScheduler(model, optimizer, dense_allocation=0.1, T_end=int(0.75 * total_steps))
    for x, y in batches:
        loss_fn(model(x), y).backward()
        if scheduler():          # False on a drop/grow step: the optimizer step is skipped there
            optimizer.step()

A fixed budget of non-zero weights per layer. Every `delta` steps until `T_end`, each sparse layer
drops the k = ⌊f_t · n_active⌋ active weights of smallest magnitude and regrows k inactive ones where
the dense gradient (averaged over the last `grad_accumulation_n` steps) is largest; regrown weights
start at zero and the optimizer's state of every changed weight is reset. The fraction decays as
f_t = α/2 · (1 + cos(π t / T_end)). Layer densities: `uniform` (every sparse layer at
`dense_allocation`, the first layer dense, as rigl-torch does) or `erk` (Erdős–Rényi-Kernel: density
∝ (Σ dims) / (Π dims), scaled so the total matches, layers that would exceed 1 kept dense).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workers.evaluation.evaluate import Built
from workers.measurement.summary import size_counts, weight_stats
from workers.models.inputs import InputSpec
from workers.models.user_model import ModelSource, construct
from workers.models.zoo import build_model, weight_layers
from workers.training.train import TrainCallback

if TYPE_CHECKING:
    from workers.evaluation.evaluate import EvalContext
    from workers.evaluation.spec import CandidateSpec

DISTRIBUTIONS = ("uniform", "erk")


def erk_densities(shapes: list[tuple[int, ...]], density: float, dense: set[int] = frozenset()) -> list[float]:
    """Per-layer densities whose non-zeros total `density` of all weights, ∝ Σ dims / Π dims (ERK).

    A layer whose density would exceed 1 is made dense and the scale recomputed for the rest (RigL's
    `get_sparsities_erdos_renyi`). `dense` names layers kept dense from the start.
    """
    sizes = [math.prod(shape) for shape in shapes]
    dense = set(dense)
    while True:
        raw = {i: sum(shape) / sizes[i] for i, shape in enumerate(shapes) if i not in dense}
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)  # non-zeros left for the sparse layers
        scale = budget / sum(raw[i] * sizes[i] for i in raw) if raw else 0.0
        over = [i for i in raw if raw[i] * scale > 1]
        if not over:
            return [1.0 if i in dense else raw[i] * scale for i in range(len(shapes))]
        dense.add(max(over, key=lambda i: raw[i]))


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, fraction: float) -> torch.Tensor:
    """The new mask (bool): drop ⌊fraction · active⌋ smallest-|w| active weights, grow as many inactive
    (after the drop) ones with the largest |grad|. Ties go to the lower flat index."""
    flat_mask = mask.reshape(-1).bool()  # reshape, not view: channels_last weights
    active = int(flat_mask.sum())
    k = int(fraction * active)
    if k == 0:
        return mask.bool()
    score = weight.detach().abs().reshape(-1).float().masked_fill(~flat_mask, float("inf"))
    dropped = torch.topk(score, k, largest=False, sorted=False).indices
    kept = flat_mask.clone()
    kept[dropped] = False
    growth = grad.detach().abs().reshape(-1).float().masked_fill(kept, -1.0)
    grown = torch.topk(growth, k, sorted=False).indices
    kept[grown] = True
    return kept.reshape(mask.shape)


class RigLScheduler:
    """Sparse masks on a model's conv / linear weights, updated by RigL. `RigLCallback` (below) wires it into
    the training step: `train_model(..., callbacks=[RigLCallback(...)])`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dense_allocation: float = 0.1,
                 T_end: int | None = None, sparsity_distribution: str = "uniform", ignore_linear_layers: bool = True,
                 delta: int = 100, alpha: float = 0.3, static_topo: bool = False, grad_accumulation_n: int = 1,
                 state_dict: dict[str, Any] | None = None, seed: int = 0) -> None:
        _check(dense_allocation, T_end, sparsity_distribution, delta, alpha, grad_accumulation_n)
        self.model, self.optimizer = model, optimizer
        layers = weight_layers(model)
        self.names = [f"{n}.weight" for n, _ in layers]
        self.W = [m.weight for _, m in layers]
        self.dense_allocation, self.T_end, self.distribution = dense_allocation, int(T_end), sparsity_distribution
        self.delta, self.alpha, self.static_topo, self.grad_accumulation_n = delta, alpha, static_topo, grad_accumulation_n
        linear = {i for i, (_, m) in enumerate(layers) if isinstance(m, nn.Linear)} if ignore_linear_layers else set()
        if sparsity_distribution == "uniform":
            dense = linear | ({0} if len(layers) > 1 else set())  # rigl-torch keeps the first layer dense
            self.densities = [1.0 if i in dense else dense_allocation for i in range(len(layers))]
        else:
            self.densities = erk_densities([tuple(w.shape) for w in self.W], dense_allocation, linear)
        if dense_allocation < 1 and all(d >= 1 for d in self.densities):
            raise ValueError("dense_allocation: no layer is left sparse (a model of linear layers only with "
                             "ignore_linear_layers=True?)")
        self.step = 0
        self.rigl_steps = 0
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.W]
        self.dense_grads: list[torch.Tensor | None] = [None] * len(self.W)
        if state_dict is not None:
            self.load_state_dict(state_dict)
        else:
            self._random_masks(seed)
        self._hooks = [w.register_hook(self._grad_hook(i)) for i, w in enumerate(self.W) if self.densities[i] < 1]
        self.apply_masks()

    # ---- the rigl-torch interface ----------------------------------------------------------------
    def __call__(self) -> bool:
        """Count a training step; on an update step change the masks and return False (skip optimizer.step())."""
        self.step += 1
        if self.static_topo or self.step % self.delta != 0 or self.step >= self.T_end:
            return True
        self._rigl_step()
        self.rigl_steps += 1
        return False

    def update_fraction(self, step: int | None = None) -> float:
        """f_t = α/2 · (1 + cos(π t / T_end)): the share of active weights an update at step t moves."""
        t = self.step if step is None else step
        return self.alpha / 2 * (1 + math.cos(math.pi * t / self.T_end))

    def next_update(self) -> int | None:
        """The step of the next drop/grow update, or None when there is none left."""
        if self.static_topo:
            return None
        nxt = (self.step // self.delta + 1) * self.delta
        return nxt if nxt < self.T_end else None

    def target_nonzeros(self) -> list[int]:
        return [int(round(d * w.numel())) for d, w in zip(self.densities, self.W)]

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every inactive weight (after each optimizer step: the non-zero count stays exact)."""
        torch._foreach_mul_(self.W, [m.to(w.dtype) for m, w in zip(self.masks, self.W)])

    def state_dict(self) -> dict[str, Any]:
        return {"masks": [m.cpu() for m in self.masks], "step": self.step, "rigl_steps": self.rigl_steps,
                "densities": list(self.densities), "dense_allocation": self.dense_allocation, "T_end": self.T_end,
                "delta": self.delta, "alpha": self.alpha, "static_topo": self.static_topo,
                "grad_accumulation_n": self.grad_accumulation_n, "distribution": self.distribution,
                "dense_grads": [None if g is None else g.cpu() for g in self.dense_grads]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = [m.to(w.device).bool() for m, w in zip(state["masks"], self.W)]
        self.dense_grads = [None if g is None else g.to(w.device) for g, w in zip(state["dense_grads"], self.W)]
        for key in ("step", "rigl_steps", "densities", "dense_allocation", "T_end", "delta", "alpha", "static_topo",
                    "grad_accumulation_n", "distribution"):
            setattr(self, key, state[key])

    def __repr__(self) -> str:
        lines = [f"RigLScheduler(step {self.step}, {self.rigl_steps} updates, next update: {self.next_update()}, "
                 f"T_end {self.T_end}, delta {self.delta}, alpha {self.alpha}, {self.distribution}, "
                 f"static_topo={self.static_topo})"]
        for name, mask, density in zip(self.names, self.masks, self.densities):
            lines.append(f"  {name:<28} {tuple(mask.shape)!s:<18} density {int(mask.sum()) / mask.numel():.4f} "
                         f"(target {density:.4f})")
        total = sum(int(m.sum()) for m in self.masks)
        lines.append(f"  total non-zero {total:,} of {sum(m.numel() for m in self.masks):,}")
        return "\n".join(lines)

    # ---- internals ------------------------------------------------------------------------------
    def _random_masks(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for i, (w, keep) in enumerate(zip(self.W, self.target_nonzeros())):
            if self.densities[i] >= 1:
                continue
            flat = torch.zeros(w.numel(), dtype=torch.bool)
            flat[torch.randperm(w.numel(), generator=generator)[:keep]] = True
            self.masks[i] = flat.reshape(w.shape).to(w.device)

    def _accumulating(self) -> bool:
        """Whether this backward pass is one of the last `grad_accumulation_n` before an update."""
        if self.static_topo or self.step >= self.T_end:
            return False
        return self.delta - (self.step % self.delta) <= self.grad_accumulation_n

    def _grad_hook(self, i: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._accumulating():
                dense = grad.detach() / self.grad_accumulation_n
                self.dense_grads[i] = dense if self.dense_grads[i] is None else self.dense_grads[i] + dense
            return grad * self.masks[i].to(grad.dtype)
        return hook

    @torch.no_grad()
    def _rigl_step(self) -> None:
        fraction = self.update_fraction()
        for i, w in enumerate(self.W):
            if self.densities[i] >= 1 or self.dense_grads[i] is None:
                continue
            new = drop_and_grow(w, self.masks[i], self.dense_grads[i], fraction)
            changed = new != self.masks[i]
            w.masked_fill_(changed & new, 0.0)  # regrown weights start at zero
            self._reset_optimizer_state(w, changed)
            self.masks[i] = new
            self.dense_grads[i] = None
        self.apply_masks()

    def _reset_optimizer_state(self, weight: torch.Tensor, changed: torch.Tensor) -> None:
        """Momentum (and any other per-weight optimizer state) of dropped and regrown weights back to zero."""
        for value in self.optimizer.state.get(weight, {}).values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                value.masked_fill_(changed, 0.0)


def _check(dense_allocation: float, T_end: int | None, distribution: str, delta: int, alpha: float,
           grad_accumulation_n: int) -> None:
    if not 0 < dense_allocation <= 1:
        raise ValueError(f"dense_allocation: must be in (0, 1], got {dense_allocation}")
    if T_end is None or int(T_end) < 1:
        raise ValueError(f"T_end: a positive number of steps is required (e.g. 75 % of all steps), got {T_end}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"sparsity_distribution: must be one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}")
    if delta < 1:
        raise ValueError(f"delta: must be a positive number of steps, got {delta}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
    if not 1 <= grad_accumulation_n < max(delta, 2):
        raise ValueError(f"grad_accumulation_n: must be in [1, delta), got {grad_accumulation_n}")


class RigLCallback(TrainCallback):
    """RigL inside `train_model`: the scheduler is built when training starts (it needs the optimizer and
    the step count: T_end = t_end_fraction of all steps) and gates every optimizer step."""

    def __init__(self, t_end_fraction: float = 0.75, seed: int = 0, **options: Any) -> None:
        self.t_end_fraction, self.seed, self.options = t_end_fraction, seed, options
        self.scheduler: RigLScheduler | None = None
        self._epoch_masks: list[torch.Tensor] = []  # the masks when the epoch began

    def on_train_begin(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int = 0) -> None:
        T_end = max(1, int(self.t_end_fraction * total_steps))
        self.scheduler = RigLScheduler(model, optimizer, T_end=T_end, seed=self.seed, **self.options)

    def on_epoch_begin(self, epoch: int) -> None:
        self._epoch_masks = [m.clone() for m in self.scheduler.masks]

    def before_optimizer_step(self, epoch: int, step: int, steps: int) -> bool:
        return self.scheduler()

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None:
        self.scheduler.apply_masks()

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: what a restarted trial needs to continue the same topology updates."""
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
        """Density, and the share of active weights that moved this epoch (each move drops one, grows one)."""
        masks = self.scheduler.masks
        active = sum(int(m.sum()) for m in masks)
        record["density"] = active / sum(m.numel() for m in masks)
        grown = sum(int((m & ~before).sum()) for m, before in zip(masks, self._epoch_masks))
        record["moved"] = grown / max(active, 1)


# The RigL options a candidate's params carry (CandidateSpec.params), with the scheduler's names.
SPEC_OPTIONS = ("alpha", "delta", "dense_allocation", "grad_accumulation_n", "ignore_linear_layers",
                "sparsity_distribution", "static_topo")


def fresh_weights(model: nn.Module, source: ModelSource | None = None, inputs: InputSpec | None = None) -> nn.Module:
    """The same network with freshly initialised weights (CPU): a zoo model rebuilt from its architecture, a
    user's network built again by its constructor (`source`: its own initialisation, every parameter included;
    taking `inputs` as the teacher does), else copied with every layer's own `reset_parameters` run."""
    if hasattr(model, "arch"):
        return build_model(model.arch)
    if source is not None:
        fresh = construct(source, inputs)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        if {k: v.shape for k, v in fresh.state_dict().items()} == shapes:
            return fresh
    fresh = copy.deepcopy(model).cpu()
    for module in fresh.modules():
        if module is not fresh and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return fresh


def sparse_footprint(model: nn.Module, inputs: InputSpec, **options: Any) -> dict[str, int]:
    """Params, MACs and non-zero counts of `model` under RigL with `options` (dense_allocation,
    sparsity_distribution, ignore_linear_layers): each layer's density is fixed for the whole training, so
    these are the trained model's, known before it trains (`searchsvc.methods.rigl.driver` skips settings over budget)."""
    sparse = copy.deepcopy(model).cpu()
    scheduler = RigLScheduler(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0), T_end=1, **options)
    counts = size_counts(sparse, inputs)  # the masks are applied: MACs of the non-zero weights
    masked = sum(int((~mask).sum()) for mask in scheduler.masks)  # (a fresh model's zero biases still count)
    return {**counts, "nonzero_params": counts["params"] - masked}


def rigl_step(parent: nn.Module, spec: "CandidateSpec", ctx: "EvalContext") -> Built:
    """The builder of `method: rigl`: the teacher's architecture with fresh weights (`init: scratch`, seeded by
    the spec) or the teacher's own, trained with RigL in the loop; density measured after training."""
    params = dict(spec.params)
    if params["init"] == "teacher":
        model = copy.deepcopy(parent).cpu().train()
    else:
        torch.manual_seed(spec.seed)
        source = ctx.teacher.meta.get("source")  # verified against the teacher's key when it was loaded
        model = fresh_weights(parent, ModelSource.from_data(source) if source else None, ctx.splits.inputs).train()
    callback = RigLCallback(float(params["t_end_fraction"]), seed=spec.seed,
                            **{k: params[k] for k in SPEC_OPTIONS})

    def finish(trained: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        stats = weight_stats(trained, ctx.splits.inputs)
        scheduler = callback.scheduler
        return trained.cpu(), {"density": 1 - stats["sparsity"], "sparsity": stats["sparsity"],
                               "nonzero_params": stats["nonzero_params"], "nonzero_macs": stats["nonzero_macs"],
                               "rigl_updates": scheduler.rigl_steps, "T_end": scheduler.T_end}

    return Built(model, callbacks=(callback,), finish=finish)
