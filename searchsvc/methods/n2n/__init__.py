"""`method: n2n` — network-to-network compression by reinforcement learning: its `search:` schema, its check
and registration (the driver: driver.py; the Gymnasium environment: env.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from searchsvc.budget import Budget
from searchsvc.registry import SearchSection, budget_field, register_method, round_to_field
from searchsvc.rewards import RewardForm

if TYPE_CHECKING:
    from searchsvc.config import JobConfig


def check_n2n(config: JobConfig) -> list[str]:
    """n2n on a user's network needs a unit to remove — a block with a skip, else a single layer (VGG, AlexNet): found
    here, at validate, when the data's shape is known (after `registry.cut_problems` has run the model on that shape
    and cut it)."""
    from workers.data.datasets import input_shape
    from workers.models.branches import fx_trace_error
    from workers.models.structure import structure_of
    from workers.models.user_model import construct
    from workers.models.zoo import build_model, is_residual, list_models, model_arch

    shape = input_shape(config.dataset)
    arch = config.teacher.arch
    if shape is None or (config.teacher.source is None and (arch not in list_models() or is_residual(arch))):
        return []
    model = construct(config.teacher.source) if config.teacher.source is not None else \
        build_model(model_arch(arch, shape.channels, 2))  # a plain zoo net: its layers (any class count)
    if not structure_of(model, shape).names:
        untraced = fx_trace_error(model)  # then no block is found at all: the tracer's error says why
        why = f"torch.fx cannot trace it ({untraced}), and " if untraced else ""
        key = "teacher.model" if config.teacher.source is not None else "teacher.arch"
        return [f"{key}: method n2n removes blocks or layers, and {config.teacher.base} has none that can "
                f"go ({why}no conv or linear layer but the classifier can be removed with the network still running); "
                "use method grid or taylor"]
    return []


@register_method("n2n", "RLlib PPO agent removes and shrinks layers of the teacher",
                 driver="searchsvc.methods.n2n.driver:run_n2n", check=check_n2n, user_models=True,
                 cuts=True)
@dataclass(frozen=True)
class N2NSearch(SearchSection):
    """Network-to-network compression by reinforcement learning (remove, then shrink layers)."""

    agent: Literal["ppo", "random"] = field(default="ppo", metadata={"help": "ppo, or random as the baseline"})
    max_evaluations: int = field(default=64, metadata={"min": 1, "help": "candidate evaluations, cache hits excluded"})
    time_budget_s: float | None = field(default=None, metadata={"gt": 0, "help": "stop after this many seconds"})
    target_compression: float | None = field(default=None, metadata={"gt": 1, "help": "stop at this x-factor"})
    reward: RewardForm = field(
        default="c_2_minus_c", metadata={"help": "C(2-C)·As/A (paper's code) or C·As/((2-C)·A) (paper's text)"})
    num_envs: int = field(default=4, metadata={"min": 1, "help": "candidates in flight at once (vector env size)"})
    iteration_evaluations: int = field(default=16, metadata={"min": 2, "help": "PPO train batch: steps per iteration"})
    shrink: bool = field(default=True, metadata={"help": "run the layer-shrinkage stage after removal"})
    shrink_share: float = field(default=0.4, metadata={"gt": 0, "lt": 1, "help": "share of the budget for shrinkage"})
    width_scales: tuple[float, ...] = field(default=(0.25, 0.5, 0.75, 1.0), metadata={
        "help": "inner-width multipliers the shrink stage chooses from, each in (0, 1]"})
    shrink_ratios: Literal["scales", "continuous"] = field(default="scales", metadata={
        "omit_default": True, "help": "scales: one of width_scales per kept unit; continuous: the paper's — any "
                                      "ratio in [min_ratio, 1] per kept unit, rounded to round_to"})
    min_ratio: float = field(default=0.1, metadata={
        "omit_default": True, "gt": 0, "max": 1, "help": "the smallest width ratio of continuous shrinkage"})
    shrink_kernels: bool = field(default=False, metadata={
        "omit_default": True, "help": "also cut a conv layer unit's kernel by its ratio (odd sizes, the centre "
                                      "kept; networks without skips and users' own, as the paper's VGG)"})
    round_to: int = round_to_field()
    policy: Literal["units", "mlp"] = field(default="units", metadata={
        "help": "PPO's network: units (one network per layer descriptor, as the paper's: transferable to a teacher "
                "of another depth) or mlp (RLlib's default over all descriptors at once)"})
    policy_from: str | None = field(default=None, metadata={
        "omit_default": True, "help": "a run id in this store whose trained n2n policy starts this search (policy "
                                      "transfer, e.g. from a ResNet-18 teacher to a ResNet-34); needs policy: units"})
    transfer_temperature: float = field(default=6.0, metadata={
        "omit_default": True, "min": 1, "help": "the transferred policy's logits are divided by this (its log-stds "
                                                "too, for continuous ratios) so that it still explores on the new "
                                                "teacher; 1: as trained (it then proposes a few networks again "
                                                "and again)"})
    checkpoint_every: int = field(default=1, metadata={"min": 1, "help": "PPO iterations between checkpoints"})
    top_k: int = field(default=5, metadata={"min": 0, "help": "best networks to fine-tune at the end"})
    finetune_epochs: int = field(default=0, metadata={"min": 0, "help": "epochs of distillation for the top-k"})
    budget: Budget | None = budget_field()
    reward_size: Literal["params", "macs", "latency_ms"] = field(default="params", metadata={
        "omit_default": True, "help": "what the reward's compression C = 1 - size/teacher's counts: params, macs, "
                                      "or latency_ms (at the budget's latency setting, else torch at batch 1)"})

    def __post_init__(self) -> None:
        if self.policy_from is not None and (self.policy != "units" or self.agent != "ppo"):
            raise ValueError("policy_from: a policy transfers to agent: ppo with policy: units")
        if self.shrink and not self.width_scales:
            raise ValueError("width_scales: the shrink stage needs at least one scale (or set shrink: false)")
        for i, scale in enumerate(self.width_scales):
            if not 0 < scale <= 1:
                raise ValueError(f"width_scales[{i}]: a width multiplier must be in (0, 1], got {scale:g}")
