"""Which torchvision classification models searchsvc can compress: every name in
`torchvision.models.list_models(module=torchvision.models)`, at a small input size, random weights; with
`--timm`, one model of each of 45 timm families instead (`TIMM`: what people bring from timm, transformers,
hybrids and CNNs; 64 px where a model has patches, so that a 16 px patch leaves 4x4 tokens).

    python benchmarks/coverage.py [--models resnet18,swin_t] [--size 32] [--timeout 900]
    python benchmarks/coverage.py --timm [--models timm:swin_tiny_patch4_window7_224]

Each model runs in a fresh process (so one model's peak memory is its own) through what a search does to a
user's network, each step checked on its own (✓, or ✗ with the first line of its error):
- structure: trace the removable blocks and channel groups (time and peak memory of that analysis), remove the
  first block and halve every group, then rebuild the candidate in a fresh constructor from its stored tensors
  alone and require exactly the same outputs (what `load_candidate` and `export` do, and what a candidate must
  pass to be recorded ok);
- grid: the halved candidate above (compression reached: MACs ÷, params ÷);
- taylor: one Taylor step (importance from 2 training batches of synthetic data, 20 % of the channels removed),
  rebuilt exactly;
- n2n: the agent's view of the model (one descriptor row per removable block; ✗ when there is no block);
- agp: structured AGP at 50 % on every group it can mask, then thinned: the thinned network must compute what the
  masked one does (groups a LayerNorm normalises are left to the cutting methods);
- export: ONNX of the halved candidate, ONNX Runtime's outputs against PyTorch's;
- quantize: ONNX Runtime's static int8 quantization of it, calibrated on synthetic images.
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
TIMM = ("vit_tiny_patch16_224 deit_tiny_patch16_224 deit3_small_patch16_224 swin_tiny_patch4_window7_224 "
        "swinv2_tiny_window8_256 convnext_atto resnet18 resnet50d efficientnet_b0 mobilenetv3_small_100 regnetx_002 "
        "levit_128s mobilevit_xxs poolformer_s12 maxvit_tiny_tf_224 coatnet_0_rw_224 edgenext_xx_small "
        "efficientformer_l1 fastvit_t8 ghostnet_100 rexnet_100 convformer_s18 caformer_s18 tiny_vit_5m_224 "
        "eva02_tiny_patch14_224 beit_base_patch16_224 cait_xxs24_224 pvt_v2_b0 twins_svt_small mixer_b16_224 "
        "resmlp_12_224 crossvit_tiny_240 densenet121 dla34 dpn68 hrnet_w18_small inception_v3 xception41 nfnet_l0 "
        "cspresnet50 hgnet_tiny repvgg_a0 mobileone_s0 efficientvit_b0 mambaout_femto").split()
SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}  # models that are built for one input size
MIN_SIZE = {"maxvit_": 224, "inception_v3": 75, "alexnet": 224, "vgg": 224, "vit_h_14": 42}  # where each exports


def input_size(name: str, size: int) -> int:
    if name.startswith("timm:"):
        return _timm_size(name[len("timm:"):], size)
    return max([size] + [v for prefix, v in MIN_SIZE.items() if name.startswith(prefix)])


def _timm_size(name: str, size: int) -> int:
    """A timm model built for one input size (patches, windows) is built for 64 px when its constructor takes
    `img_size`, else run at its own size; any other at `size` (75 px for Inception's stem)."""
    import timm
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if not config.fixed_input_size:
        return max(size, 75) if "inception" in name else size
    try:
        timm.create_model(name, num_classes=10, img_size=max(size, 64))
    except TypeError:
        return config.input_size[-1]
    return max(size, 64)


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
    from pathlib import Path

    import torch
    import torchvision

    from workers.measurement.measure import count_macs, count_parameters
    from workers.models.cutting import shrink_graph
    from workers.models.depgraph import channel_groups, removable_units
    from workers.models.inputs import InputSpec
    from workers.models.rebuild import rebuild, remove_units
    from workers.models.user_model import constructor

    if name.startswith("timm:"):
        from timm.models import get_pretrained_cfg

        native = get_pretrained_cfg(name[len("timm:"):]).input_size[-1]

    def build() -> torch.nn.Module:
        if name.startswith("timm:"):
            fixed = get_pretrained_cfg(name[len("timm:"):]).fixed_input_size
            kwargs = {"num_classes": 10, **({"img_size": size} if fixed and size != native else {})}
            model = constructor(name)(**kwargs).eval()  # what teacher.model: timm:NAME builds
        else:
            model = torchvision.models.get_model(name, **constructor_kwargs(name, size)).eval()
        for param in model.parameters():  # ViT starts its head at zero: every output 0 would compare equal
            if param.dim() > 1 and not param.detach().any():
                torch.nn.init.normal_(param, std=0.02)
        return model

    torch.manual_seed(0)
    teacher = build()
    example = InputSpec.image(3, size).example(teacher)
    start = time.perf_counter()
    units = removable_units(teacher, example)
    removed = units[:1]
    groups = channel_groups(remove_units(copy.deepcopy(teacher), removed), example)
    analysis_s = time.perf_counter() - start
    # VmHWM (kB) is this process's own peak; ru_maxrss would start at the peak of the process that forked it
    analysis_gb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1e6
    small = shrink_graph(teacher, example, removed, {g.key: max(g.slices, g.channels // 2) for g in groups})
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        again = rebuild(build(), removed, dict(small.state_dict()))
        exact = bool(torch.equal(again(images), small(images)))
    result = {"units": len(units), "groups": len(groups), "sliced_groups": sum(g.slices > 1 for g in groups),
              "analysis_s": round(analysis_s, 2), "analysis_peak_gb": round(analysis_gb, 2),
              "macs_ratio": round(count_macs(teacher, InputSpec.image(3, size)) / count_macs(small, InputSpec.image(3, size)), 2),
              "params_ratio": round(count_parameters(teacher) / count_parameters(small), 2), "rebuild_exact": exact}
    steps = {"taylor": lambda: _taylor(teacher, build, size), "n2n": lambda: _n2n(teacher, size),
             "agp": lambda: _agp(teacher, example, images), "export": lambda: _export(small, images, size),
             "quantize": lambda: _quantize(small, size)}
    for step, check in steps.items():
        try:
            result[step] = check()
        except Exception as err:  # noqa: BLE001 — a step that fails is ✗ with its reason, the others still run
            result[step] = f"✗ {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return result


def _splits(size: int):
    from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset

    synthetic = SyntheticConfig(num_classes=10, channels=3, image_size=size, train_size=16, test_size=8)
    return load_dataset(DatasetConfig(name="synthetic", synthetic=synthetic))


def _taylor(teacher, build, size: int) -> str:
    import copy

    import torch

    from workers.compression.taylor import prunable_channels, taylor_prune
    from workers.models.inputs import InputSpec
    from workers.models.rebuild import rebuild

    count = prunable_channels(teacher, InputSpec.image(3, size)) // 5
    student, plan = taylor_prune(copy.deepcopy(teacher).requires_grad_(True), _splits(size), count, 2, 8)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():  # close, not equal: the step ran in channels_last, the rebuild is contiguous
        if not torch.allclose(rebuild(build(), (), dict(student.state_dict()))(images), student(images),
                              rtol=1e-4, atol=1e-5):
            return "✗ the rebuilt step differs"
    return f"✓ {sum(plan.values())} channels"


def _n2n(teacher, size: int) -> str:
    from workers.models.inputs import InputSpec
    from workers.models.structure import structure_of

    units = structure_of(teacher, InputSpec.image(3, size))
    return f"✓ {len(units.names)} blocks" if units.names else "✗ no block with a skip"


def _agp(teacher, example, images) -> str:
    import copy

    import torch

    from workers.compression.schedule import CompressionScheduler, parse_schedule
    from workers.models.thinning import group_of_weight, thin

    model = copy.deepcopy(teacher)
    weights = sorted({group.weights[0] for group in group_of_weight(model, example).values()})
    if not weights:
        return "✗ no group can be masked and thinned exactly"
    raw = {"version": 1, "pruners": {"filters": {"class": "StructuredAGP", "initial_sparsity": 0.5,
                                                 "final_sparsity": 0.5, "weights": weights}},
           "policies": [{"pruner": {"instance_name": "filters"}, "starting_epoch": 0, "ending_epoch": 1,
                         "frequency": 1}]}
    CompressionScheduler(parse_schedule(raw, model, example=example), model, example).on_epoch_begin(0)
    thinned, removed = thin(model, example)
    with torch.no_grad():
        if not torch.allclose(thinned(images), model.eval()(images), atol=1e-4, rtol=1e-3):
            return "✗ the thinned network differs from the masked one"
    return f"✓ {len(removed)} groups"


def _export(small, images, size: int) -> str:
    import numpy as np
    import onnxruntime
    import torch

    from workers.measurement import ort
    from workers.models.inputs import InputSpec

    session = onnxruntime.InferenceSession(ort.onnx_bytes(small, InputSpec.image(3, size)), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {ort.INPUT: images.numpy()})
    with torch.no_grad():
        gap = float(np.abs(logits - small(images).numpy()).max())
    return "✓" if gap < 1e-3 else f"✗ ONNX differs by {gap:.2g}"


def _quantize(small, size: int) -> str:
    import torch

    from workers.compression.quantize import QuantizeConfig, quantize_onnx
    from workers.measurement import ort
    from workers.models.inputs import InputSpec

    calibration = torch.randn(8, 3, size, size).numpy()
    int8 = quantize_onnx(ort.onnx_bytes(small, InputSpec.image(3, size)), calibration, QuantizeConfig(calibration_batch_size=8))
    return f"✓ {len(int8) // 1024} KiB"


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


STEPS = ("taylor", "n2n", "agp", "export", "quantize")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | input | structure, grid | MACs ÷ | params ÷ | analysis s / GB | " + " | ".join(STEPS) + " |",
             "|---" * (6 + len(STEPS)) + "|"]
    for row in rows:
        if row["ok"]:
            steps = " | ".join(row.get(step, "") for step in STEPS)
            lines.append(f"| {row['model']} | {row['size']} | ✓ {row['units']} blocks, {row['groups']} groups | "
                         f"{row['macs_ratio']} | {row['params_ratio']} | {row['analysis_s']} / "
                         f"{row['analysis_peak_gb']} | {steps} |")
        else:
            reason = row.get("error", "the rebuild differs")
            lines.append(f"| {row['model']} | {row['size']} | ✗ {reason} |" + " |" * (3 + len(STEPS)))
    return "\n".join(lines)


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated names (default: every classification model; "
                        "timm:NAME for a timm model)")
    parser.add_argument("--timm", action="store_true", help="the 45 timm models of TIMM (default: torchvision's); "
                        "writes coverage_timm.json")
    parser.add_argument("--size", type=int, default=32, help="input side in pixels (raised where a model needs more)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model before it counts as ✗")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"), help="folder for the JSON")
    args = parser.parse_args()
    names = (args.models.split(",") if args.models else [f"timm:{name}" for name in TIMM] if args.timm
             else torchvision.models.list_models(module=torchvision.models))
    rows = []
    for name in names:
        rows.append(run_one(name, args.size, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    every = sum(r["ok"] and all(str(r.get(step, "")).startswith("✓") or step == "n2n" for step in STEPS)
                for r in rows)
    common.write_result(args.out, RESULT + ("_timm" if args.timm else ""),
                        {"size": args.size, "models": rows, "total": len(rows),
                         "structure_ok": sum(r["ok"] for r in rows), "every_step_ok": every})


if __name__ == "__main__":
    main()
