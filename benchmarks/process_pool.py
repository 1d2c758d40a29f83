"""Candidates per GPU-hour without Ray: worker processes (`torch.multiprocessing`, spawn) sharing one device.

Each process does what a pool actor does (`workers.evaluation.evaluate.local_context`: its share of the GPU's memory,
cuDNN autotuning, data and teacher resident, the teacher's logits computed once) and then takes
candidates from a shared queue: the device half of an evaluation (`compute_candidate`), then the store
write (`save_evaluated`) on a thread of its own while the next candidate trains, as `EvalWorker` does.
The same list of candidates is timed with 1, 2, 4... processes; the clock starts when every process
is ready and stops when the last result is stored. Used by `gpu_check.py`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from storage import LocalStore
from workers.data.datasets import DatasetConfig
from workers.evaluation.evaluate import EvalContext, compute_candidate, local_context, save_evaluated
from workers.evaluation.resources import Resources
from workers.evaluation.spec import CandidateSpec

RESULT_TIMEOUT_S = 600.0  # no result for this long: a worker hung or died


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker process of one timing needs (picklable: it crosses the spawn)."""

    store_dir: str
    teacher_hash: str
    dataset: DatasetConfig
    resources: Resources
    device: str


def removal_specs(base: CandidateSpec, blocks: tuple[str, ...], count: int, seed: int,
                  first_seed: int) -> list[CandidateSpec]:
    """`count` candidates, each block kept or removed at random (the N2N agent's first actions): the same
    architectures for the same `seed`, each with its own training seed from `first_seed` on, so that no
    timing reuses another's stored result."""
    rng = np.random.default_rng(seed)
    actions = [rng.integers(0, 2, len(blocks)) for _ in range(count)]
    return [dataclasses.replace(base, removed=tuple(b for b, a in zip(blocks, act) if a), seed=first_seed + i)
            for i, act in enumerate(actions)]


def _worker(rank: int, job: Job, tasks: Any, results: Any) -> None:
    """One worker process: ready → candidates from `tasks` until None → results ("done", hash, metrics)."""
    try:
        device = torch.device(job.device)
        ctx = local_context(LocalStore(job.store_dir), job.teacher_hash, job.dataset, job.resources, device,
                            where=f"process-{rank}")
        _warm(ctx)
        results.put(("ready", rank, None))
        with ThreadPoolExecutor(1, thread_name_prefix="store-write") as saver:
            while (spec := tasks.get()) is not None:
                done = compute_candidate(spec, ctx)
                future = saver.submit(save_evaluated, ctx.store, done)
                future.add_done_callback(lambda f, h=spec.spec_hash: results.put(
                    ("done", h, f.result()) if f.exception() is None else ("error", h, repr(f.exception()))))
    except BaseException as err:  # noqa: BLE001 — reported to the parent, which fails the timing
        results.put(("error", rank, repr(err)))
        raise


def _warm(ctx: EvalContext) -> None:
    """The once-per-worker work a candidate would otherwise pay for: the teacher's logits, on the device."""
    ctx.train_logits()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def time_processes(job: Job, specs: list[CandidateSpec], processes: int) -> dict[str, Any]:
    """Evaluate `specs` with `processes` worker processes; evaluations per hour, start-up apart."""
    context = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    tasks, results = context.Queue(), context.Queue()
    share = dataclasses.replace(job.resources, gpus_per_eval=1.0 / processes)
    started = time.perf_counter()
    procs = [context.Process(target=_worker, args=(rank, dataclasses.replace(job, resources=share), tasks, results),
                             daemon=True) for rank in range(processes)]
    for proc in procs:
        proc.start()
    try:
        _collect(results, processes, "ready")
        startup_s = time.perf_counter() - started
        clock = time.perf_counter()
        for spec in specs:
            tasks.put(spec)
        for _ in procs:
            tasks.put(None)
        metrics = _collect(results, len(specs), "done")
        wall = time.perf_counter() - clock
    finally:
        for proc in procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    ok = [m for m in metrics if m.status == "ok"]
    return {"processes": processes, "gpus_per_eval": round(share.gpus_per_eval, 4), "candidates": len(specs),
            "ok": len(ok), "startup_s": round(startup_s, 2), "wall_s": round(wall, 2),
            "candidates_per_hour": round(len(specs) / wall * 3600, 1),
            "mean_eval_s": round(statistics.mean(m.wall_s for m in ok), 3) if ok else None,
            "mean_train_s": round(statistics.mean(m.train_seconds for m in ok), 3) if ok else None}


def _collect(results: Any, count: int, kind: str) -> list[Any]:
    """`count` messages of `kind` from the workers; any error message, or silence, fails the timing."""
    out = []
    while len(out) < count:
        try:
            what, who, payload = results.get(timeout=RESULT_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"no worker result for {RESULT_TIMEOUT_S:.0f} s") from None
        if what == "error":
            raise RuntimeError(f"worker {who}: {payload}")
        if what == kind:
            out.append(payload)
    return out
