"""First-order Taylor filter pruning (Molchanov et al., "Pruning Convolutional Neural Networks for
Resource Efficient Inference", ICLR 2017): importance → removal plan → surgery, kept apart.

Importance of output channel k of a layer, averaged over `batches` training batches b:

    Θ(k) = mean_b | Σ_{n∈b} Σ_{h,w} a_n[k,h,w] · ∂L_b/∂a_n[k,h,w] |     (a: the layer's conv-bn output,
                                                                          L_b: the batch's mean loss)

the first-order estimate of how much the batch loss changes when channel k is zeroed,
L2-normalised per group, so groups of any size compete in one global ranking. A *group* is
what surgery removes as one: a block's inner width (`layer2.1`, one conv) or a residual stream
(`layer2`, every conv whose output is added into it). A stream channel's contribution is summed over
all its members before the absolute value: removing it zeroes the channel in every addition at once.

A user's network (no zoo architecture) is ranked over its dependency graph instead (`graph_taylor_scores`):
the groups are Torch-Pruning's, and a channel's importance is the first-order Taylor term of the group's
weights, Σ |w · ∂L/∂w| over every layer the channel touches, with the gradient of the mean loss over the
same batches; the same per-group L2 normalisation, global ranking and removal plan follow.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workers.data.datasets import Splits, normalize
from workers.evaluation.evaluate import Built
from workers.models.depgraph import channel_groups, dependency_graph, example_input, pruning_group, shrink_graph
from workers.models.surgery import ScoreTable, prune_groups, shrink, width_keys
from workers.models.zoo import ResNet
from workers.training.train import training_memory_format

if TYPE_CHECKING:
    from workers.evaluation.evaluate import EvalContext
    from workers.evaluation.spec import CandidateSpec

MIN_CHANNELS = 1  # a group never loses its last channel (the network must stay connected)


def count_filters(model: nn.Module) -> int:
    """Output channels summed over every conv of the network (what "filters" counts)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def taylor_scores(model: ResNet, splits: Splits, batches: int, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Θ per group key (L2-normalised, on the CPU) from `batches` training batches; the model is unchanged.

    Runs in eval mode (batch-norm uses its running statistics, as the pruned model will), on the
    device the model and `splits` are on.
    """
    groups = prune_groups(model.arch)
    activations: dict[str, torch.Tensor] = {}  # member → its output in this batch, until its gradient comes
    sums: dict[str, torch.Tensor] = {}  # member → Σ_hw a·g of the current batch, [N, C]

    def keep(name: str):
        def on_gradient(grad: torch.Tensor) -> None:
            sums[name] = (activations.pop(name) * grad).sum((2, 3)).float()

        def forward_hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            # The gradient hook must not reference `output` itself: a tensor whose own hook holds it
            # is a reference cycle that keeps every batch's activations alive.
            activations[name] = output.detach()
            output.register_hook(on_gradient)
        return forward_hook

    handles = [model.get_submodule(m).register_forward_hook(keep(m)) for g in groups for m in g.members]
    was_training = model.training
    model.eval()
    widths = width_keys(model.arch)
    totals = {g.key: torch.zeros(widths[g.key], device=splits.train[0].device) for g in groups}
    seen = 0
    try:
        for _ in _loss_batches(model, splits, batches, batch_size, seed):
            for g in groups:
                totals[g.key] += sum(sums[m] for m in g.members).sum(0).abs()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {key: _l2_normalise(total / max(seen, 1)).cpu() for key, total in totals.items()}  # mean over batches


def _l2_normalise(scores: torch.Tensor) -> torch.Tensor:
    return scores / scores.norm().clamp_min(1e-12)


def plan_removal(scores: Mapping[str, torch.Tensor], count: int,
                 slices: Mapping[str, int] | None = None) -> dict[str, int]:
    """Channels to remove per group: the `count` lowest scores across all groups, each keeping MIN_CHANNELS.

    A group with `slices` (grouped convolutions) is ranked by position, the mean score of that position across
    its slices, and loses a position from every slice at once (the last one may overshoot `count`).
    Ties are broken by group key then channel index, so the plan is deterministic.
    """
    slices = {key: (slices or {}).get(key, 1) for key in scores}
    positions = {key: values.float().view(slices[key], -1).mean(0) for key, values in scores.items()}
    entries = sorted((float(s), key, i) for key, values in positions.items() for i, s in enumerate(values))
    removed = {key: 0 for key in scores}
    left = count
    for _, key, _ in entries:
        if left <= 0:
            break
        if len(positions[key]) - removed[key] > MIN_CHANNELS:
            removed[key] += 1
            left -= slices[key]
    return {key: n * slices[key] for key, n in removed.items() if n}


def prunable_channels(model: nn.Module, in_channels: int, image_size: int) -> int:
    """Channels the ranking chooses among: one per channel group's channel (a zoo stream or inner width, or a
    dependency-graph group of a user's network)."""
    if hasattr(model, "arch"):
        widths = width_keys(model.arch)
        return sum(widths[g.key] for g in prune_groups(model.arch))
    return sum(g.channels for g in channel_groups(model, example_input(model, in_channels, image_size)))


def _loss_batches(model: nn.Module, splits: Splits, batches: int, batch_size: int, seed: int):
    """Yield after each training batch's loss.backward() (eval mode: batch-norm as the pruned model uses it)."""
    images, labels = splits.train
    device = images.device
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    layout = training_memory_format(model, device, batch_size)
    model.to(memory_format=layout)
    for start in range(0, min(batches * batch_size, len(labels)), batch_size):
        index = order[start:start + batch_size].to(device)
        x = normalize(images[index], splits.mean, splits.std).contiguous(memory_format=layout)
        F.cross_entropy(model(x), labels[index]).backward()
        yield


def graph_taylor_scores(model: nn.Module, splits: Splits, batches: int, batch_size: int, seed: int = 0,
                        slices: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Θ per dependency-graph group of a user's network (L2-normalised, on the CPU); the model is unchanged.
    `slices`, if given, receives each group's slices (what `plan_removal` needs), from the same graph."""
    example = example_input(model, splits.in_channels, splits.image_size)
    tp, graph = traced = dependency_graph(model, example)
    groups = channel_groups(model, example, traced)
    if slices is not None:
        slices.update({g.key: g.slices for g in groups})
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        seen = sum(1 for _ in _loss_batches(model, splits, batches, batch_size, seed))  # gradients add up
        importance = tp.importance.GroupTaylorImportance(normalizer=None)
        scores = {g.key: _l2_normalise(importance(pruning_group(tp, graph, model, g.key)).float() / max(seen, 1)).cpu()
                  for g in groups}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def taylor_prune(model: ResNet, splits: Splits, count: int, batches: int, batch_size: int,
                 seed: int = 0) -> tuple[ResNet, dict[str, int]]:
    """Remove the `count` least important channels: a real smaller network (CPU, eval mode) and the plan."""
    scores = taylor_scores(model, splits, batches, batch_size, seed)
    plan = plan_removal(scores, count)
    widths = width_keys(model.arch)
    new_widths = {key: widths[key] - n for key, n in plan.items()}
    return shrink(model, widths=new_widths, importance=ScoreTable(model, scores)), plan


def taylor_step(parent: ResNet, spec: "CandidateSpec", ctx: "EvalContext") -> Built:
    """The builder of `method: taylor` candidates: prune `params.prune` channels of the parent.

    The parent is the teacher or the previous iteration's stored model; its weights are not changed.
    """
    params = dict(spec.params)
    model = copy.deepcopy(parent).to(ctx.device).requires_grad_(True)
    prune = graph_taylor_prune if not hasattr(model, "arch") else taylor_prune
    student, plan = prune(model, ctx.splits, int(params["prune"]), int(params["importance_batches"]),
                          spec.train.batch_size, spec.seed)
    return Built(student, {"pruned": plan, "filters": count_filters(student), "parent_filters": count_filters(parent)})


def graph_taylor_prune(model: nn.Module, splits: Splits, count: int, batches: int, batch_size: int,
                       seed: int = 0) -> tuple[nn.Module, dict[str, int]]:
    """`taylor_prune` for a user's network: ranked and cut through its dependency graph."""
    slices: dict[str, int] = {}
    scores = graph_taylor_scores(model, splits, batches, batch_size, seed, slices)  # a score per channel of a group
    example = example_input(model, splits.in_channels, splits.image_size)
    plan = plan_removal(scores, count, slices)
    widths = {key: len(scores[key]) - n for key, n in plan.items()}
    return shrink_graph(model, example, widths=widths, scores=scores), plan
