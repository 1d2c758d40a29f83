"""Pruning to a latency budget: taylor ranking channels by importance alone (`search.cost_power: 0`) against
importance per millisecond the per-layer latency table prices (`cost_power: 1`), at the same limit.

    python benchmarks/latency_budget.py --store /tmp/latency-store [--share 0.5] [--powers 0,1]

The teacher and the shortened taylor recipe are benchmarks/budget_compare.py's (ResNet-20, Fashion-MNIST); the
budget is ONNX Runtime fp32 at batch 256 on one thread, `share` of the teacher's latency there. Each run lands its
steps on the limit by the table (workers/compression/latency_table.py); the model it hands over is the most
accurate on validation among the measured ones within the limit. At the end every handed-over model and the
teacher are timed again in this one process, alternating, so their latencies compare like with like. JSON:
benchmarks/results/latency_budget_fashion_resnet20.json.
"""

from __future__ import annotations

import argparse
import json
import statistics

import budget_compare
import common  # noqa: F401 — puts the checkout on sys.path
import torch

from searchsvc.budget import Budget
from searchsvc.reporting.compare import chosen, load_run
from storage import open_store
from workers.evaluation.evaluate import load_candidate_model
from workers.measurement.latency import LatencyProbe, time_probe
from workers.measurement.measure import count_macs
from workers.models.inputs import InputSpec
from workers.training.teacher import load_teacher

PROBE = LatencyProbe("onnxruntime", 256, 1)
ROUNDS = 5  # alternating timing rounds at the end: each model's figure is the median of its rounds
MAX_DROP = 20  # points: the stop rule must not end a trial before it reaches the limit (both reach it, then compare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="artifact store (the teacher is reused from it)")
    parser.add_argument("--share", type=float, default=0.5, help="the limit as a share of the teacher's latency")
    parser.add_argument("--powers", default="0,1", help="search.cost_power values, comma-separated")
    parser.add_argument("--limit-ms", type=float, default=None,
                        help="the limit itself (a rerun that reuses a store's runs: the same limit, the same specs)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    args = parser.parse_args()
    teacher_hash, macs = budget_compare.teacher_macs(args.store)
    store = open_store(args.store)
    teacher = load_teacher(store, teacher_hash)
    inputs = InputSpec.from_meta(teacher.meta)
    teacher_ms = time_probe(teacher.model, PROBE, torch.device("cpu"), inputs)
    limit = args.limit_ms if args.limit_ms is not None else round(args.share * teacher_ms, 1)
    budget = Budget(latency_ms=limit, latency_batch=PROBE.batch, latency_backend="onnxruntime", latency_threads=1)
    print(f"teacher {teacher_hash}: {teacher_ms:.1f} ms ({PROBE.describe()}); limit {limit} ms", flush=True)
    text = f"search.budget={{latency_ms: {limit}, latency_batch: {PROBE.batch}, latency_backend: onnxruntime}}"
    runs = {}
    for power in args.powers.split(","):
        run = budget_compare.run_method("taylor", args.store, macs // 3,
                                        [text, f"search.cost_power={power}", f"search.stop.max_drop={MAX_DROP}"])
        pick = chosen(load_run(store, run["run_id"]), budget)
        run["chosen"] = None if pick is None else {k: pick.get(k) for k in (
            "spec_hash", "val_accuracy", "accuracy", "params", "macs", PROBE.column)}
        runs[f"cost_power_{power}"] = run
        print(f"cost_power {power}: {run['chosen']}", flush=True)
    models = {"teacher": teacher.model, **{name: load_candidate_model(store, run["chosen"]["spec_hash"])
                                          for name, run in runs.items() if run["chosen"]}}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            times[name].append(time_probe(model, PROBE, torch.device("cpu"), inputs))
    timed = {name: {"ms": round(statistics.median(t), 2), "macs": count_macs(models[name], inputs)}
             for name, t in times.items()}
    result = {"benchmark": "latency_budget", "teacher": teacher_hash, "teacher_macs": macs, "probe": PROBE.column,
              "teacher_ms_at_start": teacher_ms, "limit_ms": limit, "share": args.share, "methods": runs,
              "timed_together": timed}
    common.write_result(args.out, "latency_budget_fashion_resnet20", result)
    print(json.dumps(timed))


if __name__ == "__main__":
    main()
