"""The builders of `method: agp` and of sensitivity analysis (one layer pruned alone, no training).

An AGP candidate starts from the trained teacher (Distiller's `--resume`), trains for `train.epochs`
with the schedule's scheduler in the loop, then is *thinned*: channels that structured pruning zeroed
are removed, so the stored model is physically smaller. Its metrics keep both sides:

    sparsity, nonzero_params         zeros among conv / linear weights after training, and what is left
    macs_before_thinning             dense MACs of the trained network before thinning
    macs (from measure)              dense MACs of the stored, thinned network
    nonzero_macs                     MACs that touch a non-zero weight (what sparse kernels could skip to)
    thinned                          channels removed per group key

Schedules live in the store under `schedules/<hash>.yaml` (the hash of their canonical JSON), so a
candidate names its schedule by hash (`CandidateSpec.schedule`) and any worker can load it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from core.records import canonical_json
from storage import ArtifactStore, layout
from workers.compression.pruners import filter_masks, magnitude_mask
from workers.compression.qat import LinearQuantAwareTraining
from workers.compression.quantize import (
    QAT_KEY,
    Int8Metrics,
    QuantizeConfig,
    quantize_model,
    save_int8,
    unless_unquantizable,
)
from workers.compression.schedule import CompressionScheduler, Schedule, parse_schedule
from workers.evaluation.evaluate import Built
from workers.evaluation.spec import short_hash
from workers.measurement.summary import size_counts, weight_stats
from workers.models.inputs import InputSpec
from workers.models.thinning import group_of_weight, thin
from workers.models.zoo import Model
from workers.training.task import Task

if TYPE_CHECKING:
    from workers.evaluation.evaluate import EvalContext
    from workers.evaluation.spec import CandidateSpec


def schedule_hash(raw: dict[str, Any]) -> str:
    return short_hash(canonical_json(raw))


def put_schedule(store: ArtifactStore, raw: dict[str, Any]) -> str:
    """Store a schedule mapping once under its hash; return the hash (what `CandidateSpec.schedule` holds)."""
    key = schedule_hash(raw)
    if not store.exists(layout.schedule(key)):
        store.put_bytes(layout.schedule(key), yaml.safe_dump(raw, sort_keys=False).encode())
    return key


def get_schedule(store: ArtifactStore, key: str, model: nn.Module, example: torch.Tensor | None = None) -> Schedule:
    """A stored schedule, validated against `model` (yaml.safe_load; `example`: see parse_schedule)."""
    where = store.uri_for(layout.schedule(key))
    return parse_schedule(yaml.safe_load(store.get_bytes(layout.schedule(key))), model, source=where,
                          example=example)


def agp_step(parent: Model, spec: "CandidateSpec", ctx: "EvalContext") -> Built:
    """Train a copy of the teacher under the candidate's schedule; thin it when training is done."""
    model = copy.deepcopy(parent).cpu().train()
    example = ctx.splits.inputs.example(model)
    schedule = get_schedule(ctx.store, spec.schedule, model, example)
    scheduler = CompressionScheduler(schedule, model, example)

    def finish(trained: Model) -> tuple[Model, dict[str, Any]]:
        quantizer = scheduler.finish_quantization()  # the float network quantization-aware training shaped
        before = weight_stats(trained, ctx.splits.inputs)
        thinned, removed = thin(trained.cpu(), example)
        after = weight_stats(thinned, ctx.splits.inputs)
        extra = {"sparsity": after["sparsity"], "nonzero_params": after["nonzero_params"],
                 "nonzero_macs": after["nonzero_macs"], "macs_before_thinning": before["dense_macs"],
                 "sparsity_before_thinning": before["sparsity"], "thinned": removed,
                 "schedule_epochs": schedule.last_epoch() + 1}
        figures = None if quantizer is None else unless_unquantizable(
            spec.spec_hash, lambda: qat_int8(thinned, quantizer, spec, ctx))
        extra.update(asdict(figures) if figures is not None else {})
        return thinned, extra

    return Built(model, {"schedule": spec.schedule}, callbacks=(scheduler,), finish=finish)


def qat_int8(model: Model, quantizer: LinearQuantAwareTraining, spec: "CandidateSpec",
             ctx: "EvalContext") -> Int8Metrics:
    """The int8 model that quantization-aware training ends in (workers.compression.qat), stored in the candidate's
    `int8-qat` folder, and its figures."""
    config = QuantizeConfig(per_channel=quantizer.per_channel_wts)
    quantized = quantize_model(model, ctx.splits, config, eval_threads=torch.get_num_threads(),
                               fp32_layers=quantizer.fp32_layers(model), source="qat", task=Task(spec.train.task))
    settings = {"quantizer": asdict(quantizer), "calibration": asdict(config)}
    return save_int8(ctx.store, spec.spec_hash, QAT_KEY, quantized, settings)


def final_footprint(model: nn.Module, schedule: Schedule, example: torch.Tensor, inputs: InputSpec
                    ) -> dict[str, int]:
    """What `schedule` makes of `model` at its end, without training: every pruner's masks at its policy's
    last step applied to a copy, thinned as a trial's model is. Its params, MACs and non-zero counts are the
    least a trial of this schedule can reach (one that stops short of the last epoch prunes less), so a
    setting over a budget here cannot meet it (`searchsvc.methods.agp.driver` skips it)."""
    pruned = copy.deepcopy(model).cpu().eval()
    scheduler = CompressionScheduler(schedule, pruned, example)
    for policy in schedule.policies:
        if policy.kind == "pruner" and policy.epochs:
            step = policy.step(policy.epochs[-1])
            scheduler.masks.update(schedule.pruners[policy.instance].masks(pruned, step, scheduler.groups))
    scheduler.apply_masks()
    return size_counts(thin(pruned, example)[0], inputs)


def prune_alone(model: Model, weight: str, level: float, structure: str,
                example: torch.Tensor | None = None) -> Model:
    """A copy of `model` with one weight pruned to `level`: element-wise by magnitude, or whole filters
    (with their bias / batch-norm channel, and in a ResNet the rest of the residual stream) by L1.
    `example`: an input, for the traced channel groups of a user's network."""
    pruned = copy.deepcopy(model).cpu().eval()
    params = dict(pruned.named_parameters())
    masks = {weight: magnitude_mask(params[weight], level)} if structure == "element" else \
        filter_masks(pruned, [weight], level, group_of_weight(pruned, example))
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return pruned


def sensitivity_step(parent: Model, spec: "CandidateSpec", ctx: "EvalContext") -> Built:
    """One point of a sensitivity analysis: the teacher with `params.weight` pruned to `params.level`,
    measured without fine-tuning and not kept (only its metrics are stored)."""
    params = dict(spec.params)
    model = prune_alone(parent, str(params["weight"]), float(params["level"]), str(params["structure"]),
                        ctx.splits.inputs.example(parent))
    stats = weight_stats(model, ctx.splits.inputs)
    return Built(model, {"weight": params["weight"], "level": params["level"], **stats}, train=False,
                 keep_model=False)
