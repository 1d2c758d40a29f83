"""Which torchvision classification models searchsvc can compress: every name in
`torchvision.models.list_models(module=torchvision.models)`, at a small input size, random weights.

    python benchmarks/coverage.py [--models resnet18,swin_t] [--size 32] [--timeout 600]

Each model runs in a fresh process (so one model's peak memory is its own) through the structure engine a
user model goes through (`workers.models.depgraph`): trace the removable blocks and channel groups (time and
peak memory of that analysis), remove the first block and halve every channel group, then rebuild the
candidate in a fresh constructor from its stored tensors alone and check that it computes exactly the same
outputs (what `load_candidate` and `export` do). A model that fails is ✗ with the first line of its error.
Writes benchmarks/results/coverage.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import common

RESULT = "coverage"
SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}  # models that are built for one input size
MIN_SIZE = {"maxvit_": 224, "inception_v3": 75, "alexnet": 64}  # below these the architecture cannot run


def input_size(name: str, size: int) -> int:
    return max([size] + [v for prefix, v in MIN_SIZE.items() if name.startswith(prefix)])


def constructor_kwargs(name: str, size: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_classes": 10}
    kwargs.update({key: size for prefix, key in SIZE_KWARGS.items() if name.startswith(prefix)})
    if name.startswith("maxvit_"):
        kwargs["input_size"] = (size, size)
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False  # one output tensor, as searchsvc asks of a classifier
        kwargs["init_weights"] = False  # scipy's truncated normal is slow and changes nothing here
    return kwargs


def structure(name: str, size: int) -> dict[str, Any]:
    """One model through the structure engine (run in its own process: peak memory is this model's)."""
    import copy
    import resource

    import torch
    import torchvision

    from workers.measurement.measure import count_macs, count_parameters
    from workers.models.depgraph import channel_groups, example_input, removable_units, shrink_graph
    from workers.models.rebuild import rebuild, remove_units

    def build() -> torch.nn.Module:
        model = torchvision.models.get_model(name, **constructor_kwargs(name, size)).eval()
        for param in model.parameters():  # ViT starts its head at zero: every output 0 would compare equal
            if param.dim() > 1 and not param.detach().any():
                torch.nn.init.normal_(param, std=0.02)
        return model

    torch.manual_seed(0)
    teacher = build()
    example = example_input(teacher, 3, size)
    start = time.perf_counter()
    units = removable_units(teacher, example)
    removed = units[:1]
    groups = channel_groups(remove_units(copy.deepcopy(teacher), removed), example)
    analysis_s = time.perf_counter() - start
    analysis_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB
    small = shrink_graph(teacher, example, removed, {g.key: max(g.slices, g.channels // 2) for g in groups})
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        again = rebuild(build(), removed, dict(small.state_dict()))
        exact = bool(torch.equal(again(images), small(images)))
    return {"units": len(units), "groups": len(groups), "sliced_groups": sum(g.slices > 1 for g in groups),
            "analysis_s": round(analysis_s, 2), "analysis_peak_gb": round(analysis_gb, 2),
            "macs_ratio": round(count_macs(teacher, 3, size) / count_macs(small, 3, size), 2),
            "params_ratio": round(count_parameters(teacher) / count_parameters(small), 2), "rebuild_exact": exact}


def run_one(name: str, size: int, timeout: float) -> dict[str, Any]:
    """`structure` in a child process: its result, or ✗ with the first line of what went wrong."""
    size = input_size(name, size)
    code = (f"import json, sys; sys.path.insert(0, {str(common.REPO / 'benchmarks')!r}); import coverage; "
            f"print('RESULT ' + json.dumps(coverage.structure({name!r}, {size})))")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=common.REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "ok": False, "error": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        result = json.loads(lines[-1][len("RESULT "):])
        return {"model": name, "size": size, "ok": result["rebuild_exact"], **result,
                "wall_s": round(time.perf_counter() - start, 1)}
    errors = [line for line in done.stderr.splitlines() if line and not line.startswith((" ", "Traceback"))]
    return {"model": name, "size": size, "ok": False, "error": (errors[-1] if errors else f"exit {done.returncode}")}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | input | ✓/✗ | blocks | channel groups | MACs ÷ | params ÷ | analysis s | analysis GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["ok"]:
            lines.append(f"| {row['model']} | {row['size']} | ✓ | {row['units']} | {row['groups']} | "
                         f"{row['macs_ratio']} | {row['params_ratio']} | {row['analysis_s']} | "
                         f"{row['analysis_peak_gb']} |")
        else:
            lines.append(f"| {row['model']} | {row['size']} | ✗ {row.get('error', 'rebuild differs')} |||||||")
    return "\n".join(lines)


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated names (default: every classification model)")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels (raised where a model needs more)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model before it counts as ✗")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"), help="folder for the JSON")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        rows.append(run_one(name, args.size, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    common.write_result(args.out, RESULT, {"size": args.size, "models": rows,
                                           "ok": sum(r["ok"] for r in rows), "total": len(rows)})


if __name__ == "__main__":
    main()
