"""Batch-norm recalibration: the same candidates measured with and without re-estimated BN statistics.

Runs CONFIG once (the default `train.bn_recalibration_batches`), then re-evaluates every candidate it
trained, in this process, at each of --batches recalibration batches. Only the recalibration differs:
the training steps, seeds and parents are the run's, so the weights are the same and only the batch-norm
running statistics change. Writes bn_recalibration_<name>.json with validation and test accuracy per
candidate and setting, and the mean per setting.

    python benchmarks/bn_recalibration.py --config configs/taylor-smoke.yaml --batches 0,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from common import write_result

from searchsvc.config import load_config
from searchsvc.running.job import run
from storage import (
    LocalStore,
    layout,  # noqa: E402
)
from workers.data.datasets import load_dataset
from workers.evaluation.evaluate import EvalContext, evaluate_candidate
from workers.evaluation.spec import CandidateSpec
from workers.measurement.metrics import stored_metrics
from workers.training.teacher import load_teacher


def trained_specs(store: LocalStore, run_id: str) -> list[CandidateSpec]:
    """The run's candidates that it trained (valid, not cache hits), in the order recorded."""
    rows = sorted((store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")), key=lambda r: r["order"])
    return [CandidateSpec.from_json(store.get_verified(layout.candidate(r["spec_hash"]), "spec.json").decode())
            for r in rows if r["status"] == "ok" and not r["cached"]]


def remeasure(ctx: EvalContext, spec: CandidateSpec, batches: list[int]) -> dict[str, dict[str, float]]:
    """Validation and test accuracy of `spec` trained again with each recalibration setting (the run's own
    setting is already in the store: looked up, not trained a second time)."""
    out = {}
    for count in batches:
        variant = replace(spec, train=replace(spec.train, bn_recalibration_batches=count))
        metrics = stored_metrics(ctx.store, variant.spec_hash) or evaluate_candidate(variant, ctx)
        out[str(count)] = {"val_accuracy": metrics.val_accuracy, "accuracy": metrics.accuracy}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="job config whose candidates are measured")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override (repeatable)")
    parser.add_argument("--batches", default="0,2,4,8,16,32", help="recalibration settings to compare")
    parser.add_argument("--name", help="result name (default: the config's file name)")
    parser.add_argument("--teacher-store", help="a local store whose teachers/ are copied in (not trained again)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    config = load_config(args.config, args.overrides)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bnrecal-") as folder:
        store = LocalStore(Path(folder) / "store")
        if args.teacher_store:
            shutil.copytree(Path(args.teacher_store) / "teachers", Path(folder) / "store" / "teachers")
        result = run(config, store=store, progress=False)
        specs = trained_specs(store, result.run_id)
        data = load_dataset(config.dataset)
        ctx = EvalContext(store, load_teacher(store, result.teacher_hash), data, torch.device("cpu"))
        candidates = {spec.spec_hash: remeasure(ctx, spec, batches) for spec in specs}
        teacher_val = store.get_json(f"runs/{result.run_id}/run.json")["teacher_val_accuracy"]
    means = {str(b): {key: statistics.mean(c[str(b)][key] for c in candidates.values())
                      for key in ("val_accuracy", "accuracy")} for b in batches}
    name = args.name or Path(args.config).stem
    path = write_result(args.out, f"bn_recalibration_{name}", {
        "config": args.config, "overrides": args.overrides, "method": config.method, "batches": batches,
        "candidates": candidates, "mean": means, "teacher_val_accuracy": teacher_val,
        "teacher_test_accuracy": result.teacher_accuracy})
    print(f"{len(candidates)} candidates of {args.config}; mean accuracy (val / test) per recalibration setting:")
    for b in batches:
        mean = means[str(b)]
        print(f"  {b:>3} batches: {100 * mean['val_accuracy']:6.2f} / {100 * mean['accuracy']:6.2f} %")
    print(path)


if __name__ == "__main__":
    main()
