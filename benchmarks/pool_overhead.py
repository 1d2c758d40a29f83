"""What the actor pool costs per candidate: the same evaluation in-process vs through a Ray actor.

    python benchmarks/pool_overhead.py [--candidates 6] [--epochs 1] [--out benchmarks/results]

Both paths evaluate candidates of identical cost (same transformation, different seeds, so none is a
cache hit) on the synthetic dataset with a warm worker. Each evaluation reports its own compute time;
the overhead is what the pool path adds beyond it (dispatch, cache lookup, result transfer), minus
the same for the in-process path, in ms and as a fraction of one evaluation. Whole-path times are
reported too, but their difference is dominated by run-to-run noise of the training itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402
from common import write_result  # noqa: E402

from storage import LocalStore  # noqa: E402
from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset  # noqa: E402
from workers.evaluation.evaluate import EvalContext, evaluate_candidate  # noqa: E402
from workers.evaluation.pool import EvalPool
from workers.evaluation.resources import Resources  # noqa: E402
from workers.evaluation.spec import CandidateSpec  # noqa: E402
from workers.training.teacher import TeacherConfig, load_or_train_teacher, load_teacher  # noqa: E402
from workers.training.train import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=6, help="evaluations per path (default 6)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per evaluation (default 1)")
    parser.add_argument("--train-size", type=int, default=4096, help="synthetic training images (default 4096)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the actor gets one CPU: give the in-process path the same
    data = DatasetConfig(name="synthetic", synthetic=SyntheticConfig(train_size=args.train_size, image_size=16))
    train = TrainConfig(epochs=args.epochs, batch_size=128, augment=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(f"{tmp}/store")
        splits = load_dataset(data)
        teacher = load_or_train_teacher(store, TeacherConfig(arch="resnet20", epochs=1, batch_size=128), data, splits,
                                        torch.device("cpu"), progress=False)

        def specs(offset: int) -> list[CandidateSpec]:
            base = CandidateSpec(arch="resnet20", teacher=teacher.teacher_hash, dataset=data, train=train,
                                 widths=(("layer3", 32),))
            return [dataclasses.replace(base, seed=offset + i) for i in range(args.candidates + 1)]

        ctx = EvalContext(store, load_teacher(store, teacher.teacher_hash), splits, torch.device("cpu"))
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
        pool = EvalPool(store, teacher.teacher_hash, data, Resources(gpus_per_eval=0, cpus_per_eval=1), size=1)
        local_specs, pool_specs = specs(1000), specs(2000)
        evaluate_candidate(local_specs[0], ctx)  # warm-up: teacher logits, allocator
        list(pool.map_unordered(pool_specs[:1]))  # warm-up: actor start, data and teacher load, logits
        local_s = pool_s = local_extra = pool_extra = 0.0
        for local_spec, pool_spec in zip(local_specs[1:], pool_specs[1:]):  # interleaved: same machine state
            started = time.perf_counter()
            metrics = evaluate_candidate(local_spec, ctx)
            took = time.perf_counter() - started
            local_s, local_extra = local_s + took, local_extra + took - metrics.wall_s
            started = time.perf_counter()
            (outcome,) = pool.map_unordered([pool_spec])
            took = time.perf_counter() - started
            pool_s, pool_extra = pool_s + took, pool_extra + took - outcome.metrics.wall_s
        pool.shutdown()
        ray.shutdown()
    n = args.candidates
    # Each evaluation reports its own compute time (wall_s, measured where it ran); what a path adds on
    # top of it is its overhead. The store writes after wall_s are in both paths and cancel out.
    overhead_ms = (pool_extra - local_extra) / n * 1000.0
    result = {"benchmark": "pool_overhead", "candidates": n, "epochs": args.epochs, "train_size": args.train_size,
              "in_process_s_per_eval": round(local_s / n, 4), "pool_s_per_eval": round(pool_s / n, 4),
              "overhead_ms_per_eval": round(overhead_ms, 2),
              "overhead_fraction": round(overhead_ms / 1000.0 / (local_s / n), 5),
              "end_to_end_difference_ms": round((pool_s - local_s) / n * 1000.0, 1)}
    path = write_result(args.out, "pool_overhead", result)
    print(f"in-process {local_s / n:.3f} s/eval, pool {pool_s / n:.3f} s/eval (end to end "
          f"{result['end_to_end_difference_ms']:+.1f} ms, training noise included): pool overhead {overhead_ms:.1f} ms "
          f"beyond each evaluation's own time ({100 * result['overhead_fraction']:.2f} % of an evaluation)  → {path}")


if __name__ == "__main__":
    main()
