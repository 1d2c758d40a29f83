"""Candidate evaluations per GPU-hour for the N2N setup, and what packing several candidates on a GPU gains.

    python benchmarks/evals_per_hour.py [--teacher resnet18_cifar] [--shares 1 0.5 0.25] [--candidates 32]

The setup of `configs/cifar10-resnet18-n2n.yaml`: a teacher on CIFAR-10-shaped data (synthetic, 45k training
images after the validation split), students from random removal actions (each block kept or removed
at random, as the agent's first actions are; the same list of actions at every share), one epoch of
distillation from cached teacher logits,
then measurement and the store write, through the real actor pool. For each `gpus_per_eval` share the
pool holds 1/share actors on the one GPU; after a warm-up round (actor start, data and teacher load),
`--candidates` evaluations are timed. evals/GPU-hour = candidates / wall hours; the packing gain is
each share's rate over the rate at share 1. GPU utilisation is sampled every 0.5 s with nvidia-smi.
On a CPU-only machine the shares split the machine's cores instead (evaluations per machine-hour).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from common import UtilisationSampler, cifar_shaped, write_result  # noqa: E402

from searchsvc.methods.n2n.env import removal_stage  # noqa: E402
from storage import LocalStore  # noqa: E402
from workers.data.datasets import DatasetConfig, load_dataset  # noqa: E402
from workers.evaluation.pool import EvalPool  # noqa: E402
from workers.evaluation.resources import Resources  # noqa: E402
from workers.evaluation.spec import CandidateSpec  # noqa: E402
from workers.models.surgery import removable_blocks  # noqa: E402
from workers.training.teacher import TeacherConfig, load_or_train_teacher  # noqa: E402
from workers.training.train import TrainConfig, resolve_device  # noqa: E402


def random_actions(blocks: tuple[str, ...], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` random keep/remove actions, one per block: the same list is timed at every share."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2, len(blocks)) for _ in range(count)]


def removal_specs(base: CandidateSpec, blocks: tuple[str, ...], actions: list[np.ndarray],
                  seed: int) -> list[CandidateSpec]:
    """The candidates of `actions`, each with its own training seed from `seed` on: the same architectures
    as at any other share, yet never a cache hit of another share's run."""
    stage = removal_stage(blocks, base)
    return [dataclasses.replace(stage.make_spec(action), seed=seed + i) for i, action in enumerate(actions)]


def measure_share(store: LocalStore, teacher_hash: str, data: DatasetConfig, resources: Resources,
                  warmup: list[CandidateSpec], timed: list[CandidateSpec]) -> dict[str, float | int | None]:
    """Evaluations per hour of one pool layout, after every actor has started and evaluated once."""
    pool = EvalPool(store, teacher_hash, data, resources)
    actors = pool.size
    try:
        ray.get([actor.name.remote() for actor in pool.actors])
        list(pool.map_unordered(warmup[: pool.size]))  # each actor: logits, allocator, cuDNN autotune
        sampler = UtilisationSampler()
        started = time.perf_counter()
        outcomes = list(pool.map_unordered(timed))
        wall = time.perf_counter() - started
        samples = sampler.stop()
    finally:
        pool.shutdown()
    ok = [o.metrics for o in outcomes if o.metrics.status == "ok"]
    return {"actors": actors, "candidates": len(timed), "ok": len(ok), "wall_s": round(wall, 2),
            "evals_per_hour": round(len(timed) / wall * 3600, 1),
            "mean_eval_s": round(statistics.mean(m.wall_s for m in ok), 3) if ok else None,
            "gpu_util_mean_pct": round(statistics.mean(samples), 1) if samples else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None,
                        help="teacher model (default resnet18_cifar; on a CPU resnet20, ResNet-18 takes minutes there)")
    parser.add_argument("--shares", type=float, nargs="+", default=None,
                        help="gpus_per_eval values (default 1 0.5 0.25; on a CPU 1 0.5 of the cores)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="timed evaluations per share, the same architectures at every share (default 32, CPU 16)")
    parser.add_argument("--images", type=int, default=None, help="synthetic training images (default 50000, CPU 512)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 512, CPU 64)")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON result")
    args = parser.parse_args()
    device = resolve_device("auto")
    on_gpu = device.type == "cuda"
    teacher_arch = args.teacher or ("resnet18_cifar" if on_gpu else "resnet20")
    shares = args.shares or ([1.0, 0.5, 0.25] if on_gpu else [1.0, 0.5])
    candidates = args.candidates or (32 if on_gpu else 16)
    images, batch = args.images or (50_000 if on_gpu else 512), args.batch or (512 if on_gpu else 64)
    cores = os.cpu_count() or 1
    data = cifar_shaped(images, test=1000)
    train = TrainConfig(epochs=1, batch_size=batch, augment=False)  # cached teacher logits, as in the n2n config
    ray.init(address="local", num_cpus=cores, num_gpus=1 if on_gpu else 0, include_dashboard=False,
             logging_level="WARNING")  # a Ray of its own, never another process's
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(f"{tmp}/store")
            teacher = load_or_train_teacher(store, TeacherConfig(arch=teacher_arch, epochs=1, batch_size=batch), data,
                                            load_dataset(data), device, progress=False)
            base = CandidateSpec(arch=teacher_arch, teacher=teacher.teacher_hash, dataset=data, train=train)
            blocks = removable_blocks(teacher.model)
            actions = random_actions(blocks, 8 + candidates)
            runs = {}
            for n, share in enumerate(shares):
                resources = (Resources(gpus_per_eval=share, cpus_per_eval=max(1, int(cores * share))) if on_gpu
                             else Resources(gpus_per_eval=0, cpus_per_eval=max(1, int(cores * share))))
                specs = removal_specs(base, blocks, actions, seed=100_000 * (n + 1))
                runs[str(share)] = measure_share(store, teacher.teacher_hash, data, resources, specs[:8], specs[8:])
                print(f"share {share}: {runs[str(share)]}")
    finally:
        ray.shutdown()
    rate_one = runs[str(shares[0])]["evals_per_hour"]
    gains = {share: round(run["evals_per_hour"] / rate_one, 3) for share, run in runs.items()}
    result = {"benchmark": "evals_per_hour", "teacher": teacher_arch, "images": images, "batch": batch,
              "device": str(device), "unit": "evaluations per GPU-hour" if on_gpu else "evaluations per machine-hour",
              "shares": runs, "packing_gain": gains,
              "best_evals_per_hour": max(run["evals_per_hour"] for run in runs.values())}
    path = write_result(args.out, f"evals_per_hour_{teacher_arch}_{device.type}", result)
    print(f"{teacher_arch} students, 1-epoch KD on {device}: "
          + ", ".join(f"share {s}: {r['evals_per_hour']:.0f}/h ({gains[s]:.2f}x)" for s, r in runs.items())
          + f"  → {path}")


if __name__ == "__main__":
    main()
