"""AGP on a real dataset (Fashion-MNIST, ResNet-20, CPU): element-wise to high sparsity, and structured
AGP + thinning against the dense network's latency at batch 256, both timed in this one process.

    python benchmarks/agp_fashion.py --store ./searchsvc-store   (teacher trained or reused from the store)

Writes benchmarks/results/agp_fashion_resnet20.json. About 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import time

import common  # noqa: F401 — puts the checkout on sys.path
import torch
import yaml

from searchsvc.config import load_config
from storage import open_store
from workers.compression.agp import put_schedule
from workers.data.datasets import load_dataset
from workers.evaluation.evaluate import EvalContext, evaluate_candidate, load_candidate_model
from workers.evaluation.spec import CandidateSpec
from workers.measurement.measure import latency_ms
from workers.training.teacher import load_or_train_teacher

SCHEDULES = {"element": "configs/schedules/resnet20-element.agp.yaml",
             "filters": "configs/schedules/resnet20-filters.agp.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="./searchsvc-store", help="artifact store (teacher reused from it)")
    parser.add_argument("--config", default="configs/fashion-resnet20-agp.yaml", help="job config: data, teacher, train")
    parser.add_argument("--only", choices=sorted(SCHEDULES), help="run one schedule")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=9, help="timed forward passes at batch 256 per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    store = open_store(args.store)
    splits = load_dataset(config.dataset)
    cpu = torch.device("cpu")
    teacher = load_or_train_teacher(store, config.teacher, config.dataset, splits, cpu)
    ctx = EvalContext(store, teacher, splits, cpu)
    dense = copy.deepcopy(teacher.model).eval()
    results = {"teacher_accuracy": teacher.test_accuracy, "teacher_hash": teacher.teacher_hash, "runs": {}}
    for name, path in SCHEDULES.items():
        if args.only and name != args.only:
            continue
        with open(path) as handle:
            key = put_schedule(store, yaml.safe_load(handle))
        spec = CandidateSpec(arch=config.teacher.arch, teacher=teacher.teacher_hash, dataset=config.dataset,
                             train=config.train, method="agp", schedule=key, seed=config.seed)
        started = time.perf_counter()
        metrics = evaluate_candidate(spec, ctx, progress=True)
        small = load_candidate_model(store, spec.spec_hash)
        # Interleaved timing: dense and thinned alternate, so machine noise hits both alike.
        dense_ms, small_ms = [], []
        for _ in range(3):
            dense_ms.append(latency_ms(dense, cpu, splits.inputs, 256, args.repeats))
            small_ms.append(latency_ms(small, cpu, splits.inputs, 256, args.repeats))
        run = {k: metrics.get(k) for k in ("spec_hash", "accuracy", "sparsity", "sparsity_before_thinning",
                                           "nonzero_params", "params", "macs", "macs_before_thinning", "thinned")}
        run.update(schedule=path, wall_s=time.perf_counter() - started,
                   accuracy_drop_points=100 * (teacher.test_accuracy - metrics.accuracy),
                   dense_latency_b256_ms=min(dense_ms), thinned_latency_b256_ms=min(small_ms),
                   latency_speedup_b256=min(dense_ms) / min(small_ms),
                   history=[{k: e[k] for k in ("epoch", "test_accuracy", "sparsity")} for e in metrics.history])
        results["runs"][name] = run
        print(name, {k: v for k, v in run.items() if k != "history"}, flush=True)
    suffix = f"_{args.only}" if args.only else ""
    print(common.write_result("benchmarks/results", f"agp_fashion_resnet20{suffix}", results))


if __name__ == "__main__":
    main()
