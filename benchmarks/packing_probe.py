"""Why packing small candidates on one GPU gains little, and what would: the same KD epochs run one after
another, by N threads of one process (one CUDA stream each), and by N processes.

    PYTHONPATH=. python3 benchmarks/packing_probe.py --out DIR [--arch resnet20] [--n 4] [--images 50000]

Processes get the GPU by time-slicing between their CUDA contexts (no MPS): kernels of two processes never
run at once. Threads of one process share one context, so kernels on their streams can overlap; the
GIL serialises only their Python. Each worker first runs a warm-up epoch (cuDNN autotuning), then the
timed one; gain = sequential seconds / concurrent seconds for the same N epochs. torch alone. The epochs
are `train_model`'s, so their steps are CUDA-graph replays (workers.training.cuda_graph). Under scripts/with-mps.sh
the processes share one context (MPS) and their kernels may overlap.
With --graph: a small student's training step eager against the same step captured once as a CUDA graph
(launch overhead is what packing tries to hide).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import cifar_shaped, write_result  # noqa: E402

from workers.data.datasets import Splits, load_dataset, normalize  # noqa: E402
from workers.models.zoo import create_model  # noqa: E402
from workers.training.distill import distill_loss_fn, kd_loss, teacher_logits  # noqa: E402
from workers.training.train import DistillConfig, TrainConfig, train_model  # noqa: E402


def epoch(arch: str, splits: Splits, logits: torch.Tensor, batch: int, seed: int) -> float:
    """Seconds of one cached-logits KD epoch of a fresh `arch` student on the current stream."""
    recipe = TrainConfig(epochs=1, batch_size=batch, augment=False)
    model = create_model(arch, 3, 10)
    started = time.perf_counter()
    train_model(model, splits, recipe, torch.device("cuda"), seed=seed, progress=False,
                loss_fn=distill_loss_fn(recipe.distill, cached=logits))
    torch.cuda.synchronize()
    return time.perf_counter() - started


def prepared(arch: str, images: int) -> tuple[Splits, torch.Tensor]:
    torch.backends.cudnn.benchmark = True
    splits = load_dataset(cifar_shaped(images)).to("cuda")
    teacher = create_model(arch, 3, 10).cuda().to(memory_format=torch.channels_last)
    return splits, teacher_logits(teacher, splits.train[0], splits.mean, splits.std)


def threaded(arch: str, splits: Splits, logits: torch.Tensor, batch: int, n: int) -> float:
    """N threads, one stream each, one epoch each at once (after a warm-up epoch each); wall seconds."""
    barrier, times = threading.Barrier(n + 1), []

    def work(rank: int) -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            epoch(arch, splits, logits, batch, seed=rank)
            barrier.wait()
            barrier.wait()
            epoch(arch, splits, logits, batch, seed=100 + rank)
        times.append(time.perf_counter())

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return max(times) - started


def _process(rank: int, arch: str, images: int, batch: int, ready, go, done) -> None:
    splits, logits = prepared(arch, images)
    epoch(arch, splits, logits, batch, seed=rank)
    ready.put(rank)
    go.wait()
    epoch(arch, splits, logits, batch, seed=100 + rank)
    done.put(time.perf_counter())


def processes(arch: str, images: int, batch: int, n: int) -> float:
    """N spawned processes (time-sliced contexts), one epoch each at once after a warm-up; wall seconds."""
    ctx = mp.get_context("spawn")
    ready, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_process, args=(r, arch, images, batch, ready, go, done)) for r in range(n)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    started = time.perf_counter()
    go.set()
    ends = [done.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return max(ends) - started


def graph_probe(arch: str, splits: Splits, logits: torch.Tensor, batch: int, steps: int = 80) -> dict[str, float]:
    """Seconds for `steps` KD training steps (cached logits, fused SGD), eager and replayed as one CUDA graph:
    how much of a small student's step is kernel-launch overhead."""
    model = create_model(arch, 3, 10).cuda().to(memory_format=torch.channels_last).train()
    try:  # a tensor learning rate lets a schedule change it between replays
        lr: float | torch.Tensor = torch.tensor(0.05, device="cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                    fused=True)
    except (RuntimeError, ValueError, TypeError):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                    fused=True)
    x, y = splits.train
    index = torch.zeros(batch, dtype=torch.long, device="cuda")
    order = torch.randperm(len(y), device="cuda")
    config = DistillConfig()

    def step() -> torch.Tensor:
        images = normalize(x[index], splits.mean, splits.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = kd_loss(model(images), logits[index], y[index], config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.detach()

    def timed(fn, n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for s in range(n):
            index.copy_(order[(s * batch) % (len(y) - batch):][:batch])
            fn()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: autotuning, grads, momentum buffers
        timed(step, 3)
    torch.cuda.current_stream().wait_stream(side)
    eager = timed(step, steps)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    replayed = timed(graph.replay, steps)
    return {"steps": steps, "eager_s": round(eager, 4), "graph_s": round(replayed, 4),
            "eager_ms_per_step": round(1000 * eager / steps, 3), "graph_ms_per_step": round(1000 * replayed / steps, 3),
            "graph_speedup": round(eager / replayed, 3), "tensor_lr": isinstance(lr, torch.Tensor)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--graph", action="store_true", help="instead: eager steps against one CUDA graph replayed")
    parser.add_argument("--code-version", default=None, help="recorded in the JSON (default: this checkout's commit; "
                                                             "a device machine's .git may be a stale snapshot)")
    args = parser.parse_args()
    splits, logits = prepared(args.arch, args.images)
    if args.graph:
        result = {"benchmark": "graph_probe", "arch": args.arch, "batch": args.batch,
                  **graph_probe(args.arch, splits, logits, args.batch)}
        write_result(args.out, f"graph_probe_{args.arch}", result, version=args.code_version)
        print(result)
        return
    epoch(args.arch, splits, logits, args.batch, seed=0)  # warm-up
    one = [epoch(args.arch, splits, logits, args.batch, seed=1 + i) for i in range(args.n)]
    sequential = sum(one)
    in_threads = threaded(args.arch, splits, logits, args.batch, args.n)
    in_processes = processes(args.arch, args.images, args.batch, args.n)
    result = {"benchmark": "packing_probe", "arch": args.arch, "n": args.n, "images": args.images, "batch": args.batch,
              "sequential_s": round(sequential, 3), "epoch_s": [round(t, 3) for t in one],
              "threads_s": round(in_threads, 3), "processes_s": round(in_processes, 3),
              "gain_threads": round(sequential / in_threads, 3), "gain_processes": round(sequential / in_processes, 3),
              "cuda_graph_steps": True, "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}  # scripts/with-mps.sh
    write_result(args.out, f"packing_probe_{args.arch}", result, version=args.code_version)
    print(result)


if __name__ == "__main__":
    main()
