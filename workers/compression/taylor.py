"""First-order Taylor filter pruning (Molchanov et al., "Pruning Convolutional Neural Networks for
Resource Efficient Inference", ICLR 2017): importance → removal plan → surgery, kept apart.

Importance of output channel k of a layer, averaged over `batches` training batches b:

    Θ(k) = mean_b | Σ_{n∈b} Σ_{h,w} a_n[k,h,w] · ∂L_b/∂a_n[k,h,w] |     (a: the layer's conv-bn output,
                                                                          L_b: the batch's mean loss)

the first-order estimate of how much the batch loss changes when channel k is zeroed. Every group's scores
then compete in one global ranking (workers.compression.ranking: normalised per group, per unit of a budget's
cost, in chunks of hardware multiples, landing on the budget). A *group* is
what surgery removes as one: a block's inner width (`layer2.1`, one conv) or a residual stream
(`layer2`, every conv whose output is added into it). A stream channel's contribution is summed over
all its members before the absolute value: removing it zeroes the channel in every addition at once.

A user's network (no zoo architecture) is ranked over its dependency graph instead (`graph_taylor_scores`):
the groups are Torch-Pruning's, and a channel's importance is the first-order Taylor term of the group's
weights, Σ |w · ∂L/∂w| over every layer the channel touches, with the gradient of the mean loss over the
same batches; the same ranking follows.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Mapping

import torch
from torch import nn

from workers.compression.costs import counter, group_costs
from workers.compression.latency_table import LatencyCounter
from workers.compression.ranking import Step, chunks_for, prefix, removal_order
from workers.data.datasets import Splits, normalize
from workers.data.streaming import batches as split_batches
from workers.data.streaming import device_of, epoch_order
from workers.evaluation.evaluate import Built
from workers.measurement.latency import LatencyCost
from workers.models.cutting import shrink_graph
from workers.models.depgraph import channel_groups, dependency_graph, pruning_group
from workers.models.inputs import InputSpec, in_layout
from workers.models.surgery import ScoreTable, prune_groups, shrink, width_keys, width_step
from workers.models.zoo import ResNet
from workers.training.task import Task
from workers.training.train import largest_side, training_memory_format

if TYPE_CHECKING:
    from workers.evaluation.evaluate import EvalContext
    from workers.evaluation.spec import CandidateSpec

LANDING_CHOICES = 32  # chunks after the one that crosses a budget, tried in its place (one cut each)
LATENCY_HEADROOM = 0.97  # a latency limit is landed on at this share of it (measurements move run to run)


def count_filters(model: nn.Module) -> int:
    """Output channels summed over every conv of the network (what "filters" counts)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def taylor_scores(model: ResNet, splits: Splits, batches: int, batch_size: int,
                  seed: int = 0, task: Task | None = None) -> dict[str, torch.Tensor]:
    """Θ per group key (on the CPU) from `batches` training batches; the model is unchanged.

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
    totals = {g.key: torch.zeros(widths[g.key], device=device_of(splits.train)) for g in groups}
    seen = 0
    try:
        for _ in _loss_batches(model, splits, batches, batch_size, seed, task):
            for g in groups:
                totals[g.key] += sum(sums[m] for m in g.members).sum(0).abs()
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {key: (total / max(seen, 1)).cpu() for key, total in totals.items()}  # mean over batches


def prunable_channels(model: nn.Module, inputs: InputSpec) -> int:
    """Channels the ranking chooses among: one per channel group's channel (a zoo stream or inner width, or a
    dependency-graph group of a user's network)."""
    return sum(group_widths(model, inputs).values())


def _loss_batches(model: nn.Module, splits: Splits, batches: int, batch_size: int, seed: int,
                  task: Task | None = None):
    """Yield after each training batch's loss.backward() — the task's loss, cross-entropy by default (eval mode:
    batch-norm as the pruned model uses it)."""
    task = task or Task()
    train = splits.train
    order = epoch_order(train, torch.Generator().manual_seed(seed))[:batches * batch_size]
    layout = training_memory_format(model, device_of(train), batch_size, largest_side(splits.inputs))
    model.to(memory_format=layout)
    for _, images, labels in split_batches(train, batch_size, order.to(device_of(train))):
        x = in_layout(normalize(images, splits.mean, splits.std), layout)
        task.loss(model(x), labels).backward()
        yield


def graph_taylor_scores(model: nn.Module, splits: Splits, batches: int, batch_size: int, seed: int = 0,
                        slices: dict[str, int] | None = None, task: Task | None = None) -> dict[str, torch.Tensor]:
    """Θ per dependency-graph group of a user's network (on the CPU); the model is unchanged.
    `slices`, if given, receives each group's slices (what `plan_removal` needs), from the same graph."""
    example = splits.inputs.example(model)
    tp, graph = traced = dependency_graph(model, example)
    groups = channel_groups(model, example, traced)
    if slices is not None:
        slices.update({g.key: g.slices for g in groups})
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        seen = sum(1 for _ in _loss_batches(model, splits, batches, batch_size, seed, task))  # gradients add up
        importance = tp.importance.GroupTaylorImportance(normalizer=None)
        scores = {g.key: (importance(pruning_group(tp, graph, model, g.key)).float() / max(seen, 1)).cpu()
                  for g in groups}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def taylor_prune(model: nn.Module, splits: Splits, step: Step | int, batches: int, batch_size: int, seed: int = 0,
                 full: Mapping[str, int] | None = None, cost: str | None = None, limit: float | None = None,
                 steps_left: int = 1, task: Task | None = None) -> tuple[nn.Module, dict[str, int]]:
    """Remove the least important channels as `step` asks (a count, or a Step with its normalisation, multiples
    and count): a real smaller network (CPU, eval mode) and the plan (group key → channels removed). `full`: the
    teacher's channels per group (what `round_to` is decided on); `cost` (macs or params): what `step.cost_power`
    weighs in the ranking; with `limit` the step goes toward it: at least its share of the way with `steps_left`
    steps to go (the last one reaches it), and where it would pass the limit, only as far as the fewest chunks
    within it (landing just under a budget). Zoo ResNets are ranked and cut by their architecture, any other
    network through its dependency graph. Importance is the first-order Taylor term of the `task`'s loss."""
    step = step if isinstance(step, Step) else Step(step)
    zoo = hasattr(model, "arch")
    slices: dict[str, int] = {}
    scores = taylor_scores(model, splits, batches, batch_size, seed, task) if zoo else \
        graph_taylor_scores(model, splits, batches, batch_size, seed, slices, task)
    example = splits.inputs.example(model)

    def cut(plan: dict[str, int]) -> nn.Module:
        if zoo:
            widths = width_keys(model.arch)
            return shrink(model, widths={key: widths[key] - n for key, n in plan.items()},
                          importance=ScoreTable(model, scores))
        return shrink_graph(model, example, widths={key: len(scores[key]) - n for key, n in plan.items()},
                            scores=scores)

    count = counter(cost, splits.inputs, model, next(model.parameters()).device) \
        if cost and (step.cost_power or limit is not None) else None
    costs = None
    if count is not None and step.cost_power:
        costs = group_costs(model, cost, splits.inputs, _cost_steps(model, cost, step, full, splits.inputs, slices),
                            count)
    order = removal_order(scores, slices, step, costs, full)
    chunks = chunks_for(order, step.count)
    if limit is None or count is None:
        return cut(prefix(order, chunks)), prefix(order, chunks)
    if isinstance(count, LatencyCounter):
        # A measured latency moves a few percent between runs: land a little under the limit, and a step asked
        # to prune (its parent measured over the limit) cuts something even where this measurement is under it.
        limit = min(limit, count.parent_ms) * LATENCY_HEADROOM
    plan = _toward(order, chunks, lambda p: count(cut(p)), limit, steps_left)
    return cut(plan), plan


def _cost_steps(model: nn.Module, cost: str, step: Step, full: Mapping[str, int] | None, inputs: InputSpec,
                slices: Mapping[str, int]) -> dict[str, int] | None:
    """Positions a group's cost is priced over: one for counted costs (linear in the width), a hardware
    multiple for latency (kernels compute channels in blocks: one channel alone may save nothing)."""
    if LatencyCost.parse(cost) is None:
        return None
    widths = full or group_widths(model, inputs)
    return {key: width_step(width // slices.get(key, 1), step.round_to) for key, width in widths.items()}


def _toward(order: list[tuple[str, int]], chunks: int, size: Callable[[dict[str, int]], int], limit: float,
            steps_left: int) -> dict[str, int]:
    """The chunks of `order` a step toward a budget removes: its own `chunks`, or more where they fall short of
    this step's share of the way to `limit` (what is left of it over `steps_left` steps: the last step reaches
    it), or fewer where they pass the limit: then the fewest within it, the last chunk swapped for one of the
    next LANDING_CHOICES if that lands closer under it (8 channels of a MAC-heavy group can be 6 % of a
    ResNet-18's MACs). Sizes come from cutting and counting; the searches are bisections (the size falls as
    chunks are added: about log2(len(order)) cuts)."""
    parent = size({})
    if parent <= limit:
        return {}
    share = limit if steps_left <= 1 else parent - (parent - limit) / steps_left
    if size(prefix(order, chunks)) > share:
        chunks = _fewest(order, chunks, len(order), size, share)
    if size(prefix(order, chunks)) > limit:
        return prefix(order, chunks)  # the step's share, still over the limit: later steps go on
    chunks = _fewest(order, 0, chunks, size, limit)
    best, base = prefix(order, chunks), prefix(order, chunks - 1)
    best_size = size(best)
    for key, channels in order[chunks:chunks + LANDING_CHOICES]:
        other = {**base, key: base.get(key, 0) + channels}
        other_size = size(other)
        if best_size < other_size <= limit:
            best, best_size = other, other_size
    return best


def _fewest(order: list[tuple[str, int]], low: int, high: int, size: Callable[[dict[str, int]], int],
            goal: float) -> int:
    """The fewest chunks in (low, high] whose model's size is at most `goal` (`high` if none: every chunk cut)."""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if size(prefix(order, middle)) <= goal else (middle, high)
    return high


def group_widths(model: nn.Module, inputs: InputSpec) -> dict[str, int]:
    """Channels per prunable group: a zoo ResNet's groups by its architecture, another network's by its graph."""
    if hasattr(model, "arch"):
        widths = width_keys(model.arch)
        return {g.key: widths[g.key] for g in prune_groups(model.arch)}
    return {g.key: g.channels for g in channel_groups(model, inputs.example(model))}


def taylor_step(parent: nn.Module, spec: "CandidateSpec", ctx: "EvalContext") -> Built:
    """The builder of `method: taylor` candidates: prune `params.prune` channels of the parent, ranked with
    `params.normalizer` (l2 when absent: specs stored before it existed), kept widths multiples of
    `params.round_to` (1 when absent), no group below (1 - `params.max_ratio`) of its teacher width (1 when
    absent: any), with `params.cost` weighed by `params.cost_power`, and with `params.limit`
    going toward it with `params.steps_left` pruning steps to go (`taylor_prune`).

    The parent is the teacher or the previous iteration's stored model; its weights are not changed.
    """
    params = dict(spec.params)
    model = copy.deepcopy(parent).to(ctx.device).requires_grad_(True)
    step = Step(int(params["prune"]), str(params.get("normalizer", "l2")), int(params.get("round_to", 1)),
                float(params.get("cost_power", 0.0)), float(params.get("max_ratio", 1.0)))
    cost, limit, left = params.get("cost"), params.get("limit"), int(params.get("steps_left", 1))
    full = group_widths(ctx.teacher.model, ctx.splits.inputs) \
        if (step.round_to > 1 or step.max_ratio < 1) and step.count else None  # a fine-tune step cuts nothing
    student, plan = taylor_prune(model, ctx.splits, step, int(params["importance_batches"]), spec.train.batch_size,
                                 spec.seed, full, None if cost is None else str(cost),
                                 None if limit is None else float(limit), left, Task(spec.train.task))
    return Built(student, {"pruned": plan, "filters": count_filters(student), "parent_filters": count_filters(parent)})
