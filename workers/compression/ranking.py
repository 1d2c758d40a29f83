"""Which channels one pruning step removes: every group's channels in one global ranking, cut in chunks the
hardware likes, until the step's channel count is reached or the budgeted cost is met.

- **Normalisation** (`normalizer`) puts groups of any size on one scale before they compete: `mean` divides a
  group's scores by their mean (Torch-Pruning's default; every group's channels average 1), `l2` by their L2 norm
  (a channel of a wide group then scores 1/sqrt(width) of a narrow group's alike channel, so wide groups go
  first), `none` leaves them. benchmarks/peer_torch_pruning.py measured the default (README: "Pruning").
- **Importance per unit of cost** (`costs`, group key → what cutting one position of the group saves, e.g. MACs,
  measured by workers.compression.costs; `cost_power`): a position ranks by its normalised score divided by its
  cost to that power, so at 1 the channels that buy the most MACs for the least importance go first. Measured on
  the user's ResNet-18 it lost (README: "Pruning"): the default is 0, the cost ignored.
- **Hardware multiples** (`round_to`): a group the teacher had wider than 2 x `round_to` channels per slice keeps
  a multiple of `round_to`, one wider than `round_to` a multiple of half of it (`surgery.width_step`), at least
  one multiple: it loses whole chunks, the first one taking it to the multiple below, each chunk ranked by the
  mean score of its channels. Narrower groups lose one at a time.
- **A floor** (`max_ratio`, Torch-Pruning's `max_pruning_ratio`): no group loses more than this share of the
  teacher's width, so a step cannot thin one layer to a few channels that cost latency out of proportion to
  their MACs (thin layers run far below a CPU's peak, in fp32 and more so in int8).
- **Landing**: the ranking is one order of chunks (`removal_order`); a step takes its first chunks, as many as
  its channel count asks (`plan_removal`), or fewer where a budget is met sooner (workers.compression.taylor
  finds the fewest that land within it, and a step goes at least its share of the way), so the last step sits
  just under the budget.

A group with slices (grouped convolutions, attention heads) is ranked by position, the mean score of the
position across its slices; a position leaves every slice at once. Ties break by group key then position.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch

from workers.models.surgery import width_step

Normalizer = Literal["mean", "l2", "none"]
MIN_CHANNELS = 1  # a group never loses its last position (the network must stay connected)


def normalise(scores: torch.Tensor, how: Normalizer) -> torch.Tensor:
    """A group's scores on the scale every group shares (`how`: mean, l2 or none)."""
    scores = scores.float()
    if how == "mean":
        return scores / scores.mean().clamp_min(1e-12)
    if how == "l2":
        return scores / scores.norm().clamp_min(1e-12)
    return scores


def chunk_sizes(positions: int, full: int, round_to: int, max_ratio: float = 1.0) -> list[int]:
    """The positions a group loses per chunk, from its current count down to the least it may keep: one
    position, or one multiple, or with `max_ratio` < 1 the teacher's `full` times (1 - max_ratio) rounded up
    to the group's multiple."""
    step = width_step(full, round_to)
    least = max(MIN_CHANNELS, math.ceil(round(full * (1 - max_ratio), 9)))
    floor = max(step, math.ceil(least / step) * step) if step > 1 else least
    if positions <= floor:
        return []
    if step == 1:
        return [1] * (positions - floor)
    below = (positions - 1) // step * step  # the multiple below the current count
    sizes = [positions - below] if below >= floor else []
    return sizes + [step] * max(0, (below - floor) // step)


@dataclass(frozen=True)
class Step:
    """How one step ranks: the channel count it removes, the normalisation, hardware multiples, and how much the
    cost of a position weighs (score / cost ** cost_power: 1 ranks per unit of cost, 0 ignores it)."""

    count: int  # channels to remove (the last chunk may take the step past it)
    normalizer: Normalizer = "mean"
    round_to: int = 1
    cost_power: float = 0.0
    max_ratio: float = 1.0  # the most of a group's teacher width that may go (Torch-Pruning's max_pruning_ratio)


def removal_order(scores: Mapping[str, torch.Tensor], slices: Mapping[str, int] | None = None,
                  step: Step | None = None, costs: Mapping[str, float] | None = None,
                  full: Mapping[str, int] | None = None) -> list[tuple[str, int]]:
    """Every chunk the ranking may remove, lowest first: (group key, channels). `scores`: one per channel (raw
    importance); `slices`: a group's slices (default 1); `costs`: the cost of one position per group (default: all
    alike); `full`: the teacher's channels per group (what `round_to` is decided on; default: the current ones)."""
    step = step or Step(0)
    slices = {key: (slices or {}).get(key, 1) for key in scores}
    heap: list[tuple[float, str, int]] = []
    plans: dict[str, tuple[torch.Tensor, list[int]]] = {}
    for key, values in scores.items():
        positions = normalise(values, step.normalizer).view(slices[key], -1).mean(0)
        whole = (full or {}).get(key, len(values)) // slices[key]
        sizes = chunk_sizes(len(positions), whole, step.round_to, step.max_ratio)
        plans[key] = (torch.sort(positions, stable=True).values, sizes)
        _push(heap, key, plans[key], 0, 0, (costs or {}).get(key, 1.0) ** step.cost_power)
    taken = {key: 0 for key in scores}
    order = []
    while heap:
        _, key, index = heapq.heappop(heap)
        size = plans[key][1][index]
        order.append((key, size * slices[key]))
        taken[key] += size
        _push(heap, key, plans[key], index + 1, taken[key], (costs or {}).get(key, 1.0) ** step.cost_power)
    return order


def chunks_for(order: list[tuple[str, int]], count: int) -> int:
    """How many chunks of `order` remove at least `count` channels (all of them if they remove fewer)."""
    removed = 0
    for index, (_, channels) in enumerate(order):
        if removed >= count:
            return index
        removed += channels
    return len(order)


def prefix(order: list[tuple[str, int]], chunks: int) -> dict[str, int]:
    """Channels removed per group key by the first `chunks` of `order` (only groups that lose some)."""
    plan: dict[str, int] = {}
    for key, channels in order[:chunks]:
        plan[key] = plan.get(key, 0) + channels
    return plan


def plan_removal(scores: Mapping[str, torch.Tensor], count: int, slices: Mapping[str, int] | None = None,
                 step: Step | None = None, costs: Mapping[str, float] | None = None,
                 full: Mapping[str, int] | None = None) -> dict[str, int]:
    """Channels to remove per group key: the lowest-ranked chunks until `count` channels (`removal_order`)."""
    order = removal_order(scores, slices, step, costs, full)
    return prefix(order, chunks_for(order, count))


def _push(heap: list, key: str, plan: tuple[torch.Tensor, list[int]], index: int, start: int, unit: float) -> None:
    """Queue a group's next chunk: the mean score of its positions over the group's (weighted) cost."""
    ordered, sizes = plan
    if index < len(sizes):
        score = float(ordered[start:start + sizes[index]].mean())
        heapq.heappush(heap, (score / unit if unit > 0 else float("inf"), key, index))
