"""searchsvc against Torch-Pruning on one user model: Torch-Pruning's own iterative Taylor pipeline
(`MetaPruner` + `GroupTaylorImportance`, global ranking, a linear schedule) beside searchsvc's `taylor` and
`n2n` runs on the same teacher, data and fine-tune recipe, compared at matched MACs.

    python examples/train_your_model.py -o examples/your_resnet18.pt     # the user's model (once)
    python benchmarks/peer_torch_pruning.py [--store DIR] [--steps 5] [--methods taylor,n2n] [--rankings mean:0,l2:0]
    python benchmarks/peer_torch_pruning.py --model vit   # a small torchvision ViT (trained first)

`--model vit` (configs/your-vit-taylor.yaml) runs Torch-Pruning's pipeline for torchvision's ViT as its own
examples do: the class token and position embeddings given as unwrapped parameters, `num_heads` of every
nn.MultiheadAttention (head_dim pruned alike in every head, as searchsvc does), the classifier ignored, and
`model.hidden_dim` reset to the stream's width after every step.

Torch-Pruning removes `search.filters_per_iteration` of the teacher's prunable channels per step, ranked on
`importance_batches` training batches. searchsvc is asked what a user asks it: for each of Torch-Pruning's
steps k, one taylor run with `search.budget.macs` at that step's MACs and k iterations (steps of the same share
of channels, the last landing just under the budget, the rest fine-tuning it), so both pipelines fine-tune k
times. Every pruned model is fine-tuned by the same function with the same recipe (`train:` of the config:
distillation from the teacher's cached logits), so the pruning decision and the search are what differ.
`--rankings` runs those taylor runs once per ranking (normalizer:cost_power, the first is the one matched;
the others are reported beside it). Matching: for each Torch-Pruning step, searchsvc's model with no more MACs
(2 % tolerance), chosen on validation accuracy; test accuracy only reports. Writes
benchmarks/results/peer_torch_pruning.json. About 10 minutes per ranking on 2 cores, 5 more with n2n.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import common  # noqa: E402 — puts the checkout on sys.path
import torch  # noqa: E402

import searchsvc  # noqa: E402
from searchsvc.methods.taylor.driver import prune_count  # noqa: E402
from storage import LocalStore  # noqa: E402
from workers.compression.taylor import _loss_batches, prunable_channels  # noqa: E402
from workers.data.datasets import load_dataset  # noqa: E402
from workers.evaluation.evaluate import EvalContext  # noqa: E402
from workers.measurement.measure import count_macs, count_parameters, measure  # noqa: E402
from workers.models.depgraph import classifier  # noqa: E402
from workers.training.distill import distill_loss_fn  # noqa: E402
from workers.training.teacher import load_or_train_teacher  # noqa: E402
from workers.training.train import train_model  # noqa: E402

TIE_POINTS = 0.3  # accuracy differences within this many points count as equal
MACS_TOLERANCE = 0.02  # a model with up to 2 % more MACs than a Torch-Pruning point is matched to it
CONFIGS = {"resnet18": {"taylor": "configs/your-model-taylor.yaml", "n2n": "configs/your-model-n2n.yaml"},
           "vit": {"taylor": "configs/your-vit-taylor.yaml"}}


def _transformer_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """What Torch-Pruning's ViT examples give MetaPruner: every attention's head count, and the parameters
    outside its layers with their channel dimension (class token (1, 1, D), position embeddings (1, N, D))."""
    num_heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    if not num_heads:
        return {}
    unwrapped = [(p, p.dim() - 1) for name, p in model.named_parameters()
                 if name in ("class_token", "encoder.pos_embedding")]
    return {"num_heads": num_heads, "unwrapped_parameters": unwrapped}


def _after_step(model: torch.nn.Module) -> None:
    """torchvision's VisionTransformer reads its width from `hidden_dim` in forward: Torch-Pruning's examples
    set it to the pruned stream's width after each step."""
    if hasattr(model, "hidden_dim") and hasattr(model, "conv_proj"):
        model.hidden_dim = model.conv_proj.out_channels


def torch_pruning_pipeline(ctx: EvalContext, config, steps: int) -> list[dict[str, Any]]:
    """Torch-Pruning's iterative Taylor pruning of the teacher: `steps` × (rank, prune, fine-tune, measure)."""
    import torch_pruning as tp

    splits, search, train = ctx.splits, config.search, config.train
    model = copy.deepcopy(ctx.teacher.model).cpu()
    example = splits.inputs.example(model)
    total = prunable_channels(model, splits.inputs)
    per_step = prune_count(search.filters_per_iteration, total) / total  # the share searchsvc's taylor removes
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupTaylorImportance(),
                                  global_pruning=True, pruning_ratio=min(per_step * steps, 0.95),
                                  iterative_steps=steps,
                                  ignored_layers=[model.get_submodule(classifier(model, example))],
                                  **_transformer_kwargs(model))
    loss_fn = distill_loss_fn(train.distill, cached=ctx.train_logits())
    points = []
    for step in range(1, steps + 1):
        started = time.perf_counter()
        model.eval()
        model.zero_grad(set_to_none=True)
        for _ in _loss_batches(model, splits, search.importance_batches, train.batch_size, config.seed):
            pass  # the gradients of the same batches searchsvc ranks on accumulate in .grad
        pruner.step()
        _after_step(model)
        model.zero_grad(set_to_none=True)
        history = train_model(model, splits, train, ctx.device, seed=config.seed, progress=False, loss_fn=loss_fn)
        measured = measure(model, splits, ctx.device, timed=False,
                           accuracies={"accuracy": history[-1]["test_accuracy"],
                                       "val_accuracy": history[-1]["val_accuracy"]})
        points.append({"step": step, **measured, "wall_s": round(time.perf_counter() - started, 1)})
        print(f"torch-pruning step {step}: {measured['macs'] / 1e6:.1f} M MACs, "
              f"{100 * measured['accuracy']:.2f} % test ({100 * measured['val_accuracy']:.2f} % val)", flush=True)
    return points


def searchsvc_run(method: str, config_path: str, store: LocalStore, overrides: list[str]) -> dict[str, Any]:
    """One searchsvc run of the method's your-model config: its valid candidates and wall time."""
    config = searchsvc.load_config(common.REPO / config_path, overrides)
    started = time.perf_counter()
    result = searchsvc.run(config, store=store, progress=False)
    keys = ("spec_hash", "method", "macs", "params", "accuracy", "val_accuracy", "compression", "finetuned_from",
            "iteration", "cached", "sample", "phase", "within_budget")
    rows = [{k: row.get(k) for k in keys} for row in result.table.to_pylist() if row["status"] == "ok"]
    print(f"searchsvc {method}: {len(rows)} candidates in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return {"run_id": result.run_id, "config": config_path, "overrides": overrides,
            "wall_s": round(time.perf_counter() - started, 1), "candidates": rows}


def budgeted_taylor(config_path: str, store: LocalStore, peer: list[dict[str, Any]], overrides: list[str],
                    fraction: float, ranking: str) -> dict[str, Any]:
    """One taylor run per Torch-Pruning step k: the budget at its MACs, k iterations, one trial, none stopped
    early; `ranking` is normalizer:cost_power. Their candidates together, and the runs."""
    normalizer, power = ranking.split(":")
    runs, candidates = [], []
    for point in peer:
        k = point["step"]
        run = searchsvc_run("taylor", config_path, store, [
            *overrides, f"search.iterations={k}", "search.stop.max_drop=100",
            f"search.filters_per_iteration={fraction}", "search.tune.filters_per_iteration=[]",
            f"search.tune.grace_period={k}", f"search.normalizer={normalizer}", f"search.cost_power={power}",
            f"search.budget={{macs: {point['macs']}}}"])
        runs.append({key: run[key] for key in ("run_id", "overrides", "wall_s")})
        candidates += [{**c, "budget_step": k} for c in run["candidates"]]
    return {"ranking": ranking, "runs": runs, "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "candidates": candidates}


def verdict(gap_points: float) -> str:
    return "equal" if abs(gap_points) <= TIE_POINTS else ("better" if gap_points > 0 else "worse")


def match(peer: list[dict[str, Any]], ours: list[dict[str, Any]], size: str = "macs") -> list[dict[str, Any]]:
    """Per Torch-Pruning step: searchsvc's model of at most its `size` (MACs or params, + MACS_TOLERANCE),
    chosen on validation accuracy. The tolerance keeps two pipelines that remove the same channel count
    comparable when one happens to keep a little more."""
    levels = []
    for point in peer:
        within = [c for c in ours if c[size] <= point[size] * (1 + MACS_TOLERANCE)]
        best = max(within, key=lambda c: (c["val_accuracy"], -c["macs"]), default=None)
        level = {"torch_pruning": point, "searchsvc": best}
        if best is not None:
            gap = 100 * (best["accuracy"] - point["accuracy"])
            level.update(gap_points=round(gap, 2), verdict=verdict(gap), ratio=round(best[size] / point[size], 3))
        else:
            level.update(gap_points=None, verdict="no searchsvc model at these MACs")
        levels.append(level)
    return levels


def beyond(peer: list[dict[str, Any]], ours: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """searchsvc models Torch-Pruning's schedule does not reach: more than TIE_POINTS more accurate (test)
    than some Torch-Pruning point with at least as many MACs."""
    found = []
    for c in ours:
        beaten = [p for p in peer if p["macs"] >= c["macs"] and 100 * (c["accuracy"] - p["accuracy"]) > TIE_POINTS]
        if beaten:
            worst = min(beaten, key=lambda p: p["macs"])  # the cheapest Torch-Pruning point it beats
            found.append({**c, "beats_step": worst["step"], "beats_macs": worst["macs"],
                          "by_points": round(100 * (c["accuracy"] - worst["accuracy"]), 2)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store folder (default: a temporary one); the teacher is evaluated there")
    parser.add_argument("--model", choices=sorted(CONFIGS), default="resnet18",
                        help="the user's model: resnet18 (examples/your_resnet18.pt, trained by "
                             "examples/train_your_model.py) or vit (trained by searchsvc from its config)")
    parser.add_argument("--steps", type=int, default=5, help="pruning steps of both iterative pipelines")
    parser.add_argument("--methods", default="taylor", help="searchsvc methods to run, comma-separated: taylor (the "
                        "budgeted runs), n2n (resnet18 only: its your-model config, candidates matched beside "
                        "taylor's)")
    parser.add_argument("--rankings", default="mean:0",
                        help="searchsvc taylor rankings, normalizer:cost_power, comma-separated: one set of budgeted "
                             "runs each; the first is matched, the others reported beside it")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="override for every config, e.g. train.max_images=512 for a quick try (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--name", help="the JSON's name (default peer_torch_pruning, peer_torch_pruning_vit)")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = CONFIGS[args.model]
    methods = [m for m in args.methods.split(",") if m]
    name = args.name or ("peer_torch_pruning" if args.model == "resnet18" else f"peer_torch_pruning_{args.model}")
    if set(methods) - set(configs):
        parser.error(f"--methods: {args.model} has configs for {', '.join(configs)} only")
    rankings = [r for r in args.rankings.split(",") if r]
    config = searchsvc.load_config(common.REPO / configs["taylor"], args.overrides)
    fraction = config.search.filters_per_iteration
    with tempfile.TemporaryDirectory(prefix="peer-") as folder:
        store = LocalStore(args.store or Path(folder) / "store")
        splits = load_dataset(config.dataset)
        cpu = torch.device("cpu")
        teacher = load_or_train_teacher(store, config.teacher, config.dataset, splits, cpu)
        ctx = EvalContext(store, teacher, splits, cpu)
        started = time.perf_counter()
        peer = torch_pruning_pipeline(ctx, config, args.steps)
        peer_s = time.perf_counter() - started
        runs = {method: searchsvc_run(method, configs[method], store, args.overrides)
                for method in methods if method != "taylor"}
        taylor = [budgeted_taylor(configs["taylor"], store, peer, args.overrides, fraction, ranking)
                  for ranking in rankings] if "taylor" in methods else []
    others = [c for run in runs.values() for c in run["candidates"]]
    ours = others + (taylor[0]["candidates"] if taylor else [])
    levels = match(peer, ours)
    result = {
        "teacher": {"model": config.teacher.model, "teacher_hash": teacher.teacher_hash,
                    "accuracy": teacher.test_accuracy, "val_accuracy": teacher.val_accuracy,
                    "macs": count_macs(teacher.model, splits.inputs), "params": count_parameters(teacher.model)},
        "steps": args.steps, "filters_per_iteration": config.search.filters_per_iteration,
        "importance_batches": config.search.importance_batches, "train": {"epochs": config.train.epochs,
                                                                        "max_images": config.train.max_images,
                                                                        "lr": config.train.lr},
        "torch_pruning": {"version": __import__("torch_pruning").__version__, "wall_s": round(peer_s, 1),
                          "points": peer},
        "overrides": args.overrides, "searchsvc": runs, "taylor": taylor, "matched": levels,
        "matched_params": match(peer, ours, "params"), "beyond_torch_pruning": beyond(peer, ours),
        "rankings": {t["ranking"]: {"wall_s": t["wall_s"], "matched": match(peer, others + t["candidates"])}
                     for t in taylor},
        "tie_points": TIE_POINTS, "macs_tolerance": MACS_TOLERANCE,
    }
    path = common.write_result(args.out, name, result)
    for t in taylor[1:]:
        print(f"ranking {t['ranking']}: " + ", ".join(
            f"{level['verdict']} {level.get('gap_points')}" for level in match(peer, others + t["candidates"])))
    for level in levels:
        p, s = level["torch_pruning"], level["searchsvc"]
        mine = f"{s['method']} {s['macs'] / 1e6:.1f} M MACs {100 * s['accuracy']:.2f} %" if s else "none"
        print(f"step {p['step']}: torch-pruning {p['macs'] / 1e6:.1f} M MACs {100 * p['accuracy']:.2f} % | "
              f"searchsvc {mine} | {level['verdict']}")
    print(path)


if __name__ == "__main__":
    main()
