"""Distiller's model summaries, as rows: `sparsity` (per weight) and `compute` (per layer).

    sparsity: name, shape, params, nnz, sparsity %, zero filters %   + "Total sparsity" row
    compute:  name, type, kernel/stride, IFM, OFM, weights, MACs, non-zero MACs   + totals row

MACs are per image (a multiply-accumulate per weight use). "Non-zero MACs" counts only the uses of
non-zero weights: what a sparse kernel could skip, while dense hardware still pays the full MACs —
which is why thinning (removing whole channels) is what makes a pruned network faster.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import torch
from torch import nn

from workers.models.inputs import InputSpec
from workers.models.zoo import weight_layers

SUMMARY_KINDS = ("sparsity", "compute")
TOTAL = "Total"


@torch.no_grad()
def sparsity_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Per conv / linear weight: shape, params, non-zeros, sparsity %, and all-zero filters (rows) %."""
    rows, params, nnz = [], 0, 0
    for name, layer in weight_layers(model):
        weight = layer.weight.detach()
        count, nonzero = weight.numel(), int(weight.count_nonzero())
        dead = int(weight.reshape(weight.shape[0], -1).ne(0).any(1).logical_not().sum())
        rows.append({"name": f"{name}.weight", "shape": "x".join(map(str, weight.shape)), "params": count,
                     "nnz": nonzero, "sparsity_pct": 100.0 * (1 - nonzero / count),
                     "zero_filters_pct": 100.0 * dead / weight.shape[0]})
        params, nnz = params + count, nnz + nonzero
    rows.append({"name": f"{TOTAL} sparsity", "shape": "", "params": params, "nnz": nnz,
                 "sparsity_pct": 100.0 * (1 - nnz / max(params, 1)), "zero_filters_pct": None})
    return rows


@torch.no_grad()
def compute_summary(model: nn.Module, inputs: InputSpec) -> list[dict[str, Any]]:
    """Per conv / linear layer for one example: feature-map shapes, weights, MACs and non-zero MACs."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def hook(name: str):
        def record(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            output = output[0] if isinstance(output, tuple) else output  # nn.MultiheadAttention: (out, weights)
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        return record

    layers = weight_layers(model)
    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()]
    was_training = model.training
    model.eval()
    try:
        model(inputs.example(model))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows, totals = [], {"weights": 0, "macs": 0, "nonzero_macs": 0}
    for name, layer in layers:
        ifm, ofm = shapes[_called(name, shapes)]
        weight = layer.weight.detach()
        # a conv's weights are used once per output pixel, a linear layer's once per token (1 for a vector)
        positions = ofm[1] * ofm[2] if isinstance(layer, nn.Conv2d) else math.prod(ofm[:-1])
        macs = weight.numel() * positions
        density = int(weight.count_nonzero()) / weight.numel()
        attrs = f"k={layer.kernel_size[0]} s={layer.stride[0]}" if isinstance(layer, nn.Conv2d) else ""
        row = {"name": name, "type": type(layer).__name__, "attrs": attrs, "ifm": "x".join(map(str, ifm)),
               "ofm": "x".join(map(str, ofm)), "weights": weight.numel(), "macs": macs,
               "nonzero_macs": int(round(macs * density))}
        rows.append(row)
        for key in totals:
            totals[key] += row[key]
    rows.append({"name": TOTAL, "type": "", "attrs": "", "ifm": "", "ofm": "", **totals})
    return rows


def _called(name: str, shapes: dict[str, Any]) -> str:
    """`name`, or the nearest module around it that was called: attention layers use their projections' weights
    without calling them (nn.MultiheadAttention's out_proj, Swin's qkv and proj), on the tokens they were given."""
    while name not in shapes and name:
        name = name.rpartition(".")[0]
    return name


def weight_stats(model: nn.Module, inputs: InputSpec) -> dict[str, Any]:
    """Sparsity (0..1) of the conv / linear weights (Distiller's "Total sparsity"), non-zero parameters
    (all of them: biases and batch-norm too, so they compare with `params`), dense and non-zero MACs."""
    total = sparsity_summary(model)[-1]
    compute = compute_summary(model, inputs)[-1]
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return {"sparsity": total["sparsity_pct"] / 100, "nonzero_params": nonzero, "dense_macs": compute["macs"],
            "nonzero_macs": compute["nonzero_macs"]}


def size_counts(model: nn.Module, inputs: InputSpec) -> dict[str, int]:
    """Params and MACs of `model`, dense and non-zero: what a budget judges a model by (searchsvc.budget)."""
    stats = weight_stats(model, inputs)
    return {"params": sum(p.numel() for p in model.parameters()), "macs": stats["dense_macs"],
            "nonzero_params": stats["nonzero_params"], "nonzero_macs": stats["nonzero_macs"]}


def summary(model: nn.Module, kind: str, inputs: InputSpec) -> list[dict[str, Any]]:
    """The `kind` summary (sparsity or compute) of `model`."""
    if kind == "sparsity":
        return sparsity_summary(model)
    if kind == "compute":
        return compute_summary(model, inputs)
    raise ValueError(f"unknown summary kind {kind!r}; choose one of {', '.join(SUMMARY_KINDS)}")


def to_csv(rows: list[dict[str, Any]]) -> bytes:
    """The rows as CSV (header from the first row's keys)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: numbers right-aligned with thousands separators, percentages to 2 places."""
    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    header = [k.replace("_pct", " %").replace("_", " ") for k in rows[0]]
    body = [[cell(k, v) for k, v in row.items()] for row in rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    numeric = [isinstance(rows[0][k], (int, float)) for k in rows[0]]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(b) for b in body])
