"""The four methods on one teacher at one MACs budget, side by side: n2n, taylor, agp (structured, thinned)
and rigl compress the same ResNet-20 Fashion-MNIST teacher with `search.budget.macs` a third of its MACs,
then `searchsvc compare` puts the runs on one page.

    python benchmarks/budget_compare.py --store /tmp/budget-store [--out benchmarks/results]

The teacher is the recipe of configs/quickstart.yaml (trained once, or reused from the store). Each method
runs from its own shipped config with the overrides below (shorter than the shipped runs, to fit a 2-core
machine). Writes budget_compare_fashion_resnet20.json (per method: its run, wall time, and the model it hands
over within the budget, chosen on validation, with its test accuracy), compare-fashion-resnet20.html and
a screenshot of it (headless Chromium, when installed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401 — puts the checkout on sys.path

from searchsvc.budget import Budget
from searchsvc.reporting.compare import chosen, load_run
from storage import open_store
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec
from workers.training.teacher import load_teacher

TEACHER = ["teacher.arch=resnet20", "teacher.epochs=4", "teacher.batch_size=256", "teacher.lr=0.1",
           "teacher.weight_decay=0.0005", "teacher.augment=false"]
SHORT = ["train.max_images=12000", "train.batch_size=256", "train.augment=false"]
METHODS = {
    "n2n": ("configs/quickstart.yaml", ["search.reward_size=macs", "search.max_evaluations=12"]),
    "taylor": ("configs/fashion-resnet20-taylor.yaml",
               ["search.tune.filters_per_iteration=[]", "search.filters_per_iteration=0.1", "search.iterations=8",
                "search.stop.max_drop=5", "search.tune.grace_period=8"]),
    "agp": ("configs/fashion-resnet20-agp.yaml",
            ["search.schedule=configs/schedules/resnet20-filters.agp.yaml", "train.epochs=7",
             "search.tune.final_sparsity=[{inner_widths: 0.6}, {inner_widths: 0.7}, {inner_widths: 0.8}]",
             "search.tune.grace_period=7"]),
    "rigl": ("configs/fashion-mlp-rigl.yaml",
             ["search.init=teacher", "train.distill={alpha: 0.9, temperature: 4}", "train.lr=0.02", "train.epochs=6",
              "search.ignore_linear_layers=true", "search.delta=50", "search.tune.static_topo=[]",
              "search.tune.dense_allocation=[0.1, 0.15, 0.2]", "search.tune.grace_period=6", "resources.gpus_per_eval=0.25"]),
}


def run_method(name: str, store: str, budget_macs: int, extra: list[str]) -> dict:
    """One method's run through the CLI (`extra`: overrides after its own); its run id and wall seconds."""
    config, overrides = METHODS[name]
    sets = [*TEACHER, *SHORT, *overrides, f"search.budget={{macs: {budget_macs}}}", *extra]
    argv = [sys.executable, "-m", "searchsvc", "run", config, "--store", store, "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    before = set(open_store(store).list("runs/")) if Path(store).exists() else set()
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    new = sorted({k.split("/")[1] for k in set(open_store(store).list("runs/")) - before})
    print(f"{name}: run {new[-1]} in {wall / 60:.1f} min", flush=True)
    return {"run_id": new[-1], "wall_s": round(wall, 1), "overrides": sets}


def teacher_macs(store: str) -> tuple[str, int]:
    """The teacher of the first config (trained now if the store lacks it), and its MACs per image."""
    config, _ = METHODS["n2n"]
    argv = [sys.executable, "-m", "searchsvc", "run", config, "--store", store, "--no-progress",
            "--set", "method=grid", "--set", "search={candidates: []}"]
    for item in [*TEACHER, *SHORT]:
        argv += ["--set", item]
    subprocess.run(argv, check=True, capture_output=True, text=True)  # an empty grid: the teacher alone
    opened = open_store(store)
    latest = sorted({k.split("/")[1] for k in opened.list("runs/")})[-1]
    teacher_hash = opened.get_json(f"runs/{latest}/run.json")["teacher_hash"]
    teacher = load_teacher(opened, teacher_hash)
    return teacher_hash, count_macs(teacher.model, InputSpec.from_meta(teacher.meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="artifact store (the teacher is reused from it)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON, HTML and PNG")
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated methods (default: all four)")
    parser.add_argument("--reuse", default="", metavar="METHOD=RUN,...",
                        help="finished runs of this benchmark in the store to take as they are (their own wall time)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every method's run after its own (repeatable), e.g. search.max_ratio=0.5")
    parser.add_argument("--tag", default="", help="suffix of the JSON's name (budget_compare_fashion_resnet20_TAG)")
    args = parser.parse_args()
    teacher_hash, macs = teacher_macs(args.store)
    budget = macs // 3
    print(f"teacher {teacher_hash}: {macs:,} MACs; budget {budget:,}", flush=True)
    store = open_store(args.store)
    reused = dict(item.split("=", 1) for item in args.reuse.split(",") if item)
    runs = {name: {"run_id": run_id, "wall_s": store.get_json(f"runs/{run_id}/run.json")["wall_s"], "reused": True}
            for name, run_id in reused.items()}
    runs.update({name: run_method(name, args.store, budget, args.set) for name in args.only.split(",") if name not in reused})
    for name, run in runs.items():
        pick = chosen(load_run(store, run["run_id"]), Budget(macs=budget))
        run["chosen"] = None if pick is None else {k: pick.get(k) for k in (
            "spec_hash", "val_accuracy", "accuracy", "params", "macs", "nonzero_macs", "latency_ms")}
        print(f"{name}: {run['chosen']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # compare refuses an output folder that does not exist
    page = out / "compare-fashion-resnet20.html"
    subprocess.run([sys.executable, "-m", "searchsvc", "compare", "--store", args.store,
                    *(a for r in runs.values() for a in ("--run", r["run_id"])), "-o", str(page)], check=True)
    chromium = shutil.which("chromium")
    if chromium:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,1900", f"--screenshot={out / 'compare-fashion-resnet20.png'}",
                        page.resolve().as_uri()], capture_output=True, timeout=120)
    result = {"benchmark": "budget_compare", "teacher": teacher_hash, "teacher_macs": macs, "budget_macs": budget,
              "methods": runs}
    common.write_result(out, "_".join(filter(None, ["budget_compare_fashion_resnet20", args.tag])), result)
    print(json.dumps({n: (r["chosen"] or {}).get("accuracy") for n, r in runs.items()}))


if __name__ == "__main__":
    main()
