"""Per-candidate time spent outside training in a real N2N search: the gaps in which the worker waits.

    python benchmarks/driver_overhead.py [--budget 32] [--teacher tiny_cnn] [--out benchmarks/results]

The search is `configs/n2n-smoke.yaml`'s removal stage (the RLlib PPO agent, the real pool and store) run with one
candidate in flight (`search.num_envs=1`) and one actor holding the whole device, so the actor is idle
exactly while everything else happens: the result's store write, the Ray return, the driver's row and
parquet write, the agent's step, its PPO update and checkpoint every `iteration_evaluations` steps, and
the next dispatch. Each evaluation records when it started (`started_unix_s`) and its compute time
(`wall_s`); the gap before the next one is overhead. Reported per trained candidate: the mean (PPO
updates and checkpoints amortised), the median (an ordinary step) and p90, in ms and as a fraction
of the mean evaluation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from common import write_result  # noqa: E402

import searchsvc  # noqa: E402
from storage import open_store  # noqa: E402
from workers.measurement.metrics import stored_metrics  # noqa: E402
from workers.training.train import resolve_device  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "n2n-smoke.yaml"


def idle_gaps(store_path: str, rows: list[dict]) -> tuple[list[float], list[float]]:
    """Seconds between one evaluation's end and the next one's start, and each evaluation's seconds."""
    store = open_store(store_path)
    metrics = [stored_metrics(store, row["spec_hash"]) for row in rows if not row["cached"]]
    metrics = sorted((m for m in metrics if m is not None and m.started_unix_s is not None),
                     key=lambda m: m.started_unix_s)
    gaps = [b.started_unix_s - (a.started_unix_s + a.wall_s) for a, b in zip(metrics, metrics[1:])]
    return gaps, [m.wall_s for m in metrics]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=32, help="candidates trained (default 32)")
    parser.add_argument("--iteration", type=int, default=16, help="PPO steps per training iteration (default 16)")
    parser.add_argument("--teacher", default=None, help="teacher model (default: resnet18_cifar on a GPU, "
                                                        "else resnet20: 9 removable blocks, few repeats)")
    parser.add_argument("--images", type=int, default=None, help="synthetic training images (default 50000 on a "
                                                                 "GPU in CIFAR-10 shape, else the smoke config's)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    device = resolve_device("auto")
    cores = os.cpu_count() or 1
    overrides = [f"search.max_evaluations={args.budget}", "search.num_envs=1", "search.shrink=false",
                 f"search.iteration_evaluations={args.iteration}", "search.top_k=0",
                 f"resources.cpus_per_eval={cores}", f"resources.gpus_per_eval={1 if device.type == 'cuda' else 0}"]
    if device.type == "cuda":  # the n2n config's shape: CIFAR-10 images, batch 512, ResNet-18 teacher
        overrides += ["dataset.synthetic.num_classes=10", "dataset.synthetic.channels=3",
                      "dataset.synthetic.image_size=32", f"dataset.synthetic.train_size={args.images or 50_000}",
                      "dataset.synthetic.test_size=1000", f"teacher.arch={args.teacher or 'resnet18_cifar'}",
                      "teacher.epochs=1", "teacher.batch_size=512", "train.batch_size=512"]
    else:
        overrides += [f"teacher.arch={args.teacher or 'resnet20'}", "teacher.epochs=2"]
        overrides += [f"dataset.synthetic.train_size={args.images}"] if args.images else []
    config = searchsvc.load_config(CONFIG, overrides)
    with tempfile.TemporaryDirectory() as store:
        result = searchsvc.run(config, store=store, progress=False)
        gaps, evals = idle_gaps(store, result.table.to_pylist())
    gap_ms = sorted(1000.0 * g for g in gaps)
    mean_eval_s = statistics.mean(evals)
    mean_ms = statistics.mean(gap_ms)
    out = {"benchmark": "driver_overhead", "device": str(device), "teacher": config.teacher.arch,
           "budget": args.budget, "iteration_evaluations": args.iteration, "candidates_timed": len(evals),
           "mean_eval_s": round(mean_eval_s, 4), "overhead_mean_ms": round(mean_ms, 2),
           "overhead_median_ms": round(statistics.median(gap_ms), 2),
           "overhead_p90_ms": round(gap_ms[int(0.9 * (len(gap_ms) - 1))], 2), "overhead_max_ms": round(gap_ms[-1], 2),
           "overhead_fraction": round(mean_ms / 1000.0 / mean_eval_s, 5),
           # the few long gaps: the PPO update and checkpoint after every `iteration_evaluations` steps
           "long_gaps": sum(g > 5 * statistics.median(gap_ms) for g in gap_ms)}
    path = write_result(args.out, f"driver_overhead_{device.type}", out)
    print(f"{len(evals)} candidates of {mean_eval_s:.3f} s on {device}: outside training {mean_ms:.1f} ms mean, "
          f"{out['overhead_median_ms']:.1f} ms median, {out['overhead_p90_ms']:.1f} ms p90 "
          f"({100 * out['overhead_fraction']:.2f} % of an evaluation)  → {path}")


if __name__ == "__main__":
    main()
