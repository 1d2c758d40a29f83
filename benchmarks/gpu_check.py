"""The GPU path checked in one command, with torch alone (no Ray, boto3, gymnasium or torch-pruning).

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR              # one GPU: under 8 minutes on an H100
    PYTHONPATH=. python3 benchmarks/gpu_check.py --out DIR --device cpu --tiny   # the same code, under a minute

Four parts, one JSON each in --out, a table at the end; the exit status is 1 if a part failed:
  tests   `pytest -m "gpu and not ray"` (tests/test_gpu.py, tests/test_cuda_graph.py): correctness on the GPU; TF32 off where a test
          compares with fp32. CUDA-only: not run with --device cpu.
  sync    one training epoch of `train_model` (cached logits, then a live teacher) with
          `torch.cuda.set_sync_debug_mode("error")` around its step loop: any host sync there fails it.
          With cached logits the watched steps are CUDA-graph replays (plus the eager optimizer step).
          The first epoch (cuDNN autotuning, allocator growth) is not watched; the second is.
  epoch   one ResNet-18 distillation epoch (50,000 CIFAR-shaped images, batch 512): our loop, a plain
          DataLoader loop in the same precision and layout, and an fp32 plain loop, with cached teacher
          logits and with a live teacher; then ours compiled (`torch.compile`), its compile time apart.
          Seconds, images/s, TFLOP/s and the share of the bf16 peak (benchmarks/epoch_time.py).
  pool    candidates per GPU-hour without Ray: the same 16 one-epoch KD candidates (random block
          removals) evaluated by 1, 2 and 4 worker processes sharing the GPU, each with its memory share,
          end to end (training, measurement, the store write); once for ResNet-18 students of a ResNet-18
          teacher, once for ResNet-20-sized students (the packing figure: 4 processes over 1). Then 1 and 4
          processes again with the CUDA-graph step off (`resources.cuda_graph: false`): its gain, same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common, epoch_time, process_pool

import torch  # noqa: E402
from common import REPO, UtilisationSampler, cifar_shaped, write_result  # noqa: E402
from epoch_time import kd_epoch  # noqa: E402
from process_pool import Job, removal_specs, time_processes  # noqa: E402

from storage import LocalStore  # noqa: E402
from workers.data.datasets import load_dataset  # noqa: E402
from workers.evaluation.resources import Resources  # noqa: E402
from workers.evaluation.spec import CandidateSpec  # noqa: E402
from workers.models.surgery import removable_blocks  # noqa: E402
from workers.models.zoo import create_model  # noqa: E402
from workers.training.distill import distill_loss_fn, inference_copy, teacher_logits  # noqa: E402
from workers.training.teacher import TeacherConfig, load_or_train_teacher  # noqa: E402
from workers.training.train import TrainCallback, TrainConfig, train_model  # noqa: E402

PARTS = ("tests", "sync", "epoch", "pool")
TEST_FILES = ("tests/test_gpu.py", "tests/test_cuda_graph.py")  # their CUDA tests need no Ray
# Targets on one H100 (issue 22): KD epoch seconds, candidates per GPU-hour, packing gain.
TARGETS = {"epoch_cached_s": 1.0, "epoch_live_s": 1.3, "resnet18_per_hour": 1500, "packing_gain": 1.5}


def sizes(tiny: bool) -> dict[str, Any]:
    """Workload sizes: the real ones, or tiny ones that run the same code in seconds on a CPU."""
    if tiny:
        return {"arch": "resnet20", "images": 128, "batch": 64, "sync_images": 128, "loader_workers": 0,
                "compile": False, "setups": ("resnet20",), "pool_images": 256, "processes": (1, 2),
                "eager_processes": (), "candidates": 2}  # eager vs graphed: a GPU figure (the same loop on a CPU)
    return {"arch": "resnet18_cifar", "images": 50_000, "batch": 512, "sync_images": 8192,
            "loader_workers": min(8, os.cpu_count() or 1), "compile": True, "setups": ("resnet18_cifar", "resnet20"),
            "pool_images": 50_000, "processes": (1, 2, 4), "eager_processes": (1, 4),
            "candidates": 16}


def gpu_tests(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """The CUDA tests that need no Ray, in a pytest process of their own; counts from its JUnit report."""
    if device.type != "cuda":
        return {"ran": False, "ok": True, "reason": "CUDA-only tests: not run with --device cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not ray",
                               *TEST_FILES, f"--junitxml={report}"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path})
        seconds = time.perf_counter() - started
        cases = ET.parse(report).getroot().iter("testcase") if report.exists() else []
        outcomes = {f"{c.get('classname')}::{c.get('name')}": _outcome(c) for c in cases}
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
    ok = proc.returncode == 0 and counts["passed"] > 0 and counts["failed"] == counts["skipped"] == 0
    return {"ran": True, "ok": ok, **counts, "returncode": proc.returncode, "seconds": round(seconds, 1),
            "tests": outcomes, "output_tail": (proc.stdout + proc.stderr)[-3000:]}


def _outcome(case: ET.Element) -> str:
    tags = {child.tag for child in case}
    return "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"


class SyncGuard(TrainCallback):
    """Host syncs raise inside the step loop of epoch `epoch` (from 0); counts the steps it watched."""

    graph_safe = True  # host-side work only: the watched loop may be the CUDA-graph one

    def __init__(self, epoch: int, device: torch.device) -> None:
        self.epoch, self.cuda, self.steps = epoch, device.type == "cuda", 0

    def on_epoch_begin(self, epoch: int) -> None:
        if epoch == self.epoch and self.cuda:
            torch.cuda.set_sync_debug_mode("error")

    def on_minibatch_end(self, epoch: int, step: int, steps: int) -> None:
        if epoch != self.epoch:
            return
        self.steps += 1
        if step == steps - 1 and self.cuda:
            torch.cuda.set_sync_debug_mode("default")  # the epoch's one sync (the mean loss) comes next


def sync_check(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """`train_model`'s second epoch under the sync guard, with cached logits and with a live teacher."""
    splits = load_dataset(cifar_shaped(size["sync_images"])).to(device)
    teacher = create_model(size["arch"], 3, 10).to(device, memory_format=torch.channels_last)
    variants = {}
    for live in (False, True):
        recipe = TrainConfig(epochs=2, batch_size=size["batch"], augment=live)
        loss_fn = (distill_loss_fn(recipe.distill, teacher=inference_copy(teacher, device)) if live else
                   distill_loss_fn(recipe.distill, cached=teacher_logits(teacher, splits.train[0], splits.mean,
                                                                        splits.std)))
        guard, name = SyncGuard(1, device), "live" if live else "cached"
        try:
            history = train_model(create_model(size["arch"], 3, 10), splits, recipe, device, progress=False,
                                  loss_fn=loss_fn, callbacks=[guard])
            variants[name] = {"ok": guard.steps > 0, "steps_watched": guard.steps,
                              "cuda_graph": history[-1]["cuda_graph"]}
        except RuntimeError as err:  # the sync debug mode's error names the synchronising call
            variants[name] = {"ok": False, "steps_watched": guard.steps, "error": str(err)[:800]}
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return {"ok": all(v["ok"] for v in variants.values()), "watched": device.type == "cuda",
            "note": None if device.type == "cuda" else "sync debug mode is CUDA's: the same loop ran unwatched",
            "variants": variants}


def epoch_times(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """The KD epoch with cached logits and with a live teacher (ours and both plain loops), then compiled."""
    torch.backends.cudnn.benchmark = True
    common = dict(arch=size["arch"], images=size["images"], batch=size["batch"], device=device,
                  workers=size["loader_workers"])
    result = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
              "cached": kd_epoch(**common, live=False), "live": kd_epoch(**common, live=True)}
    if size["compile"]:  # compile time apart: the first epoch's excess over the second
        result["cached_compiled"] = kd_epoch(**common, live=False, compile_model=True, plain_loops=False)
    result["ok"] = True
    return result


def pool_rates(device: torch.device, size: dict[str, Any]) -> dict[str, Any]:
    """Candidates per hour with 1, 2, 4 worker processes, for each teacher; the packing gain of each count.
    The same counts' first and last run again with the CUDA-graph step off: the eager baseline, same run."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(f"{tmp}/store")
        for arch in size["setups"]:
            data = cifar_shaped(size["pool_images"], 1000 if size["pool_images"] >= 10_000 else 128)
            teacher = load_or_train_teacher(store, TeacherConfig(arch=arch, epochs=1, batch_size=size["batch"]), data,
                                            load_dataset(data), device, progress=False)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the workers get the GPU's memory
            base = CandidateSpec(arch=arch, teacher=teacher.teacher_hash, dataset=data,
                                 train=TrainConfig(epochs=1, batch_size=size["batch"], augment=False))
            blocks = removable_blocks(teacher.model)
            plan = [(True, p) for p in size["processes"]] + [(False, p) for p in size["eager_processes"]]
            runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            for n, (graph, processes) in enumerate(plan):
                job = Job(f"{tmp}/store", teacher.teacher_hash, data, Resources(cpus_per_eval=1, cuda_graph=graph),
                          str(device))
                specs = removal_specs(base, blocks, size["candidates"], seed=0, first_seed=100_000 * (n + 1))
                runs[graph].append(_timed_pool(job, specs, processes, device))
                print(f"  {arch}: {processes} process(es), {'CUDA graph' if graph else 'eager'}: "
                      f"{runs[graph][-1]['candidates_per_hour']:.0f}/hour", flush=True)
            result[arch] = _pool_figures(runs[True], runs[False])
    result["ok"] = all(r["ok"] == r["candidates"] for arch in size["setups"]
                       for r in (*result[arch]["runs"], *result[arch]["eager_runs"]))
    return result


def _timed_pool(job: Job, specs: list[CandidateSpec], processes: int, device: torch.device) -> dict[str, Any]:
    """One timing of `specs` by `processes` workers, with the GPU's mean utilisation meanwhile."""
    sampler = UtilisationSampler() if device.type == "cuda" else None
    run = time_processes(job, specs, processes)
    samples = sampler.stop() if sampler else None
    run["gpu_util_mean_pct"] = round(sum(samples) / len(samples), 1) if samples else None
    run["cuda_graph"] = job.resources.cuda_graph
    return run


def _pool_figures(graphed: list[dict[str, Any]], eager: list[dict[str, Any]]) -> dict[str, Any]:
    """Packing gain (each count over one process, both with the CUDA-graph step) and the graph's gain over
    the eager step at the same count."""
    one = graphed[0]["candidates_per_hour"]
    by_count = {r["processes"]: r["candidates_per_hour"] for r in graphed}
    return {"runs": graphed, "eager_runs": eager,
            "packing_gain": {str(r["processes"]): round(r["candidates_per_hour"] / one, 3) for r in graphed},
            "graph_gain": {str(r["processes"]): round(by_count[r["processes"]] / r["candidates_per_hour"], 3)
                           for r in eager},
            "best_per_hour": max(r["candidates_per_hour"] for r in graphed + eager)}


PART_FUNCTIONS: dict[str, Callable[[torch.device, dict[str, Any]], dict[str, Any]]] = {
    "tests": gpu_tests, "sync": sync_check, "epoch": epoch_times, "pool": pool_rates}
FILES = {"tests": "gpu_tests", "sync": "sync_check", "epoch": "epoch_time", "pool": "candidates_per_hour"}


def summary(results: dict[str, dict[str, Any]], device: torch.device, tiny: bool) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows for the table; targets only for the full run on a GPU."""
    aim = device.type == "cuda" and not tiny
    rows = []
    if "tests" in results:
        t = results["tests"]
        rows.append(("GPU tests (pytest -m 'gpu and not ray')", f"{t.get('passed', 0)} passed, {t.get('failed', 0)} "
                     f"failed, {t.get('skipped', 0)} skipped" if t.get("ran") else t.get("reason", t.get("error", "")),
                     "all pass"))
    if "sync" in results:
        s = results["sync"]
        rows.append(("no host sync in the step loop", "ok" if s.get("ok") else f"FAILED {s.get('error', '')}"[:60],
                     "ok"))
    if "epoch" in results and "cached" in results["epoch"]:
        e = results["epoch"]
        for key, target in (("cached", "epoch_cached_s"), ("live", "epoch_live_s")):
            r = e[key]
            rows.append((f"{r['arch']} KD epoch of {r['images']} images, {r['teacher']} (s)",
                         f"{r['ours_epoch_s']:.2f}", f"<= {TARGETS[target]}" if aim else ""))
            rows.append(("  plain matched / plain fp32 (s)",
                         f"{r['plain_matched_epoch_s']:.2f} / {r['plain_epoch_s']:.2f}", ""))
            rows.append(("  TFLOP/s, share of bf16 peak", f"{r['achieved_tflops']:.1f}, " +
                         (f"{100 * r['fraction_of_peak']:.1f} %" if r["fraction_of_peak"] else "-"), ""))
        if "cached_compiled" in e:
            c = e["cached_compiled"]
            rows.append(("  compiled epoch, cached (s) / compile (s)",
                         f"{c['ours_epoch_s']:.2f} / {c['compile_s']:.1f}", ""))
    if "pool" in results and results["pool"].get("ok") is not None:
        for arch, r in results["pool"].items():
            if isinstance(r, dict) and "runs" in r:
                counts = "/".join(str(x["processes"]) for x in r["runs"])
                rows.append((f"{arch} candidates per hour ({counts} processes)",
                             " / ".join(f"{x['candidates_per_hour']:.0f}" for x in r["runs"]),
                             f">= {TARGETS['resnet18_per_hour']}" if aim and arch == "resnet18_cifar" else ""))
                gain = r["packing_gain"][str(r["runs"][-1]["processes"])]
                rows.append((f"  packing gain ({r['runs'][-1]['processes']} processes / 1)", f"{gain:.2f}x",
                             f">= {TARGETS['packing_gain']}x" if aim and arch == "resnet20" else ""))
                eager = r.get("eager_runs", [])
                if eager:
                    rows.append((f"  eager step ({'/'.join(str(x['processes']) for x in eager)} processes)",
                                 " / ".join(f"{x['candidates_per_hour']:.0f}" for x in eager), ""))
                    rows.append(("  CUDA-graph step over eager, same processes",
                                 " / ".join(f"{g:.2f}x" for g in r["graph_gain"].values()), ""))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON results (created)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default: fails at once without a GPU) or cpu (with --tiny: the CI run)")
    parser.add_argument("--tiny", action="store_true", help="tiny workloads: the same code paths in seconds")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    parser.add_argument("--code-version", default=None, help="recorded in the JSON (default: this checkout's commit)")
    parser.add_argument("--pool-archs", default=None,
                        help="comma-separated teachers of the pool part (default: resnet18_cifar,resnet20; tiny: resnet20)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: --only: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__} sees no GPU); "
              "run with --device cpu --tiny for the CPU check", file=sys.stderr)
        return 1
    device, size = torch.device(args.device), sizes(args.tiny)
    if args.pool_archs:
        size["setups"] = tuple(a.strip() for a in args.pool_archs.split(",") if a.strip())
    results: dict[str, dict[str, Any]] = {}
    for part in parts:
        started = time.perf_counter()
        print(f"gpu_check: {part} ...", flush=True)
        try:
            results[part] = PART_FUNCTIONS[part](device, size)
        except Exception as err:  # noqa: BLE001 — one part's failure is reported, the others still run
            traceback.print_exc()
            results[part] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
        results[part]["part_seconds"] = round(time.perf_counter() - started, 1)
        meta = {"part": part, "tiny": args.tiny, "device_name": torch.cuda.get_device_name(0) if
                device.type == "cuda" else "cpu", "cuda": torch.version.cuda,
                "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))}  # scripts/with-mps.sh
        write_result(args.out, FILES[part], {**meta, **results[part]}, version=args.code_version)
        print(f"gpu_check: {part} {'ok' if results[part]['ok'] else 'FAILED'} in {results[part]['part_seconds']} s",
              flush=True)
    rows = summary(results, device, args.tiny)
    width = max(len(r[0]) for r in rows) if rows else 0
    print(f"\n{'figure':<{width}}  {'value':<24} target")
    for figure, value, target in rows:
        print(f"{figure:<{width}}  {value:<24} {target}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
