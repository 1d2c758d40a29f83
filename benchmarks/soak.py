"""Soak: the read-only commands run many times, each as its own process, while CPU-bound processes load
every core. Every call must exit with its own status (0; 2 for the bad config) and complete output.

Why: under load `searchsvc results` used to abort at interpreter exit (status 134, "terminate called
without an active exception") in about 1 call in 3; see `storage.base.arrow_owned`. An idle machine
rarely shows it, so this loads the cores on purpose.

    python benchmarks/soak.py                          # make soak: builds a grid-smoke store, ~21 minutes
    python benchmarks/soak.py --store DIR --run ID --calls results=24,validate=6 --max-seconds 60

Writes soak.json (calls, failures, seconds) to --out; exits 1 if any call failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common import write_result  # noqa: E402  (common puts the checkout on sys.path)

from core.errors import SearchsvcError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GRID = REPO / "configs" / "grid-smoke.yaml"
DEFAULT_CALLS = "validate=200,results=200,report=50,export=50,summary=50,bad=20,run=10"
FAST = ["--no-progress", "--set", "train.epochs=1", "--set", "dataset.synthetic.train_size=512"]
BAD_CONFIG = "method: grid\ntrain: {epoch: 3}\n"  # a misspelt key: exit 2, one line naming train.epoch


@dataclass(frozen=True)
class Target:
    """What the commands run against: a store, one of its runs, one kept candidate, its result rows."""

    store: str
    run_id: str
    spec_hash: str
    rows: int
    work: Path


@dataclass(frozen=True)
class Check:
    """One command: its argv after `searchsvc`, the exit status it must give, and a test of its output."""

    argv: list[str]
    status: int
    complete: Callable[[subprocess.CompletedProcess], str | None]  # None when the output is whole


def _results_whole(target: Target) -> Callable[[subprocess.CompletedProcess], str | None]:
    def check(done: subprocess.CompletedProcess) -> str | None:
        try:
            rows = json.loads(done.stdout)
        except json.JSONDecodeError as err:
            return f"stdout is not one JSON document: {err}"
        return None if len(rows) == target.rows else f"{len(rows)} rows, expected {target.rows}"
    return check


def _file_ends_with(path: Path, tail: bytes, min_bytes: int = 1) -> Callable[[subprocess.CompletedProcess], str | None]:
    def check(done: subprocess.CompletedProcess) -> str | None:
        data = path.read_bytes() if path.exists() else b""
        if len(data) < min_bytes or not data.rstrip().endswith(tail):
            return f"{path.name}: {len(data)} bytes, does not end with {tail!r}"
        return None
    return check


def _stdout_has(text: str) -> Callable[[subprocess.CompletedProcess], str | None]:
    return lambda done: None if text in done.stdout else f"stdout lacks {text!r}"


def _one_error_line(done: subprocess.CompletedProcess) -> str | None:
    lines = done.stderr.strip().splitlines()
    ok = len(lines) == 1 and lines[0].startswith("searchsvc: error:") and "train.epoch" in lines[0]
    return None if ok else f"stderr is not one error line naming train.epoch: {done.stderr.strip()[-300:]!r}"


def make_check(command: str, index: int, target: Target) -> Check:
    """The call `index` of `command` (outputs go to files of their own, so calls never share one)."""
    store = ["--store", target.store]
    if command == "validate":
        return Check(["validate", str(GRID)], 0, _stdout_has(": ok (method grid"))
    if command == "bad":
        bad = target.work / "bad.yaml"
        return Check(["validate", str(bad)], 2, _one_error_line)
    if command == "results":
        return Check(["results", *store, "--run", target.run_id, "--json"], 0, _results_whole(target))
    if command == "report":
        html = target.work / f"report-{index}.html"
        return Check(["report", *store, "--run", target.run_id, "-o", str(html)], 0, _file_ends_with(html, b"</html>"))
    if command == "export":
        onnx = target.work / f"model-{index}.onnx"
        return Check(["export", *store, target.spec_hash, "-o", str(onnx)], 0, _file_ends_with(onnx, b"", 100))
    if command == "summary":
        return Check(["summary", *store, target.spec_hash], 0, _stdout_has("Total sparsity"))
    if command == "run":  # the store's own grid run again: a local Ray, every candidate a cache hit
        return Check(["run", str(GRID), *store, *FAST], 0, _stdout_has(f"{target.rows} cache hits"))
    raise SystemExit(f"soak: unknown command {command!r} in --calls")


def run_call(command: str, index: int, target: Target) -> dict:
    """Run one call; a dict with its status, seconds and the first problem found (None if none)."""
    check = make_check(command, index, target)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "searchsvc", *check.argv], capture_output=True, text=True,
                          cwd=target.work, env=env, timeout=300)
    if done.returncode != check.status:
        problem = f"exit status {done.returncode}, expected {check.status}: {done.stderr.strip()[-300:]!r}"
    else:
        problem = check.complete(done)
    return {"command": command, "index": index, "status": done.returncode, "s": time.perf_counter() - start,
            "problem": problem}


def _spin(parent: int) -> None:
    """Burn a core until the soak ends, or its process dies without stopping us (a killed test)."""
    while os.getppid() == parent:
        for _ in range(1_000_000):
            pass


def start_load(processes: int) -> list[multiprocessing.Process]:
    """CPU-bound processes, one per core asked for (the load under which the aborts showed)."""
    load = [multiprocessing.Process(target=_spin, args=(os.getpid(),), daemon=True) for _ in range(processes)]
    for proc in load:
        proc.start()
    return load


def build_store(folder: Path) -> str:
    """A new store holding one grid-smoke run (5 kept candidates)."""
    store = folder / "store"
    argv = [sys.executable, "-m", "searchsvc", "run", str(GRID), "--store", str(store), *FAST]
    subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return str(store)


def open_target(store: str, run_id: str | None, work: Path) -> Target:
    """Read the run's rows (the latest run's by default) once, here, and pick its best kept candidate to
    export and summarise."""
    from searchsvc.reporting.table import read_results
    from storage import open_store
    from storage.layout import latest_run

    opened = open_store(store, create=False)
    run_id = run_id or latest_run(opened)
    rows = read_results(opened, run_id).to_pylist()
    kept = [row["spec_hash"] for row in rows if row.get("artifact")]
    if not kept:
        raise SystemExit(f"soak: run {run_id} in {store} kept no candidate to export")
    (work / "bad.yaml").write_text(BAD_CONFIG)
    return Target(store, run_id, kept[0], len(rows), work)


def parse_calls(text: str) -> dict[str, int]:
    calls = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        calls[name.strip()] = int(count)
    return calls


def soak(target: Target, calls: dict[str, int], jobs: int, max_seconds: float, seed: int = 0) -> dict:
    """Every call, `jobs` at a time, until done or `max_seconds` have passed. Round-robin over the commands
    (each round in a shuffled order), so every command has run before a deadline cuts the rest."""
    rng, order = random.Random(seed), []
    for index in range(max(calls.values(), default=0)):
        round_ = [(name, index) for name, count in calls.items() if index < count]
        rng.shuffle(round_)
        order += round_
    deadline = time.monotonic() + max_seconds
    start = time.perf_counter()

    def call(item: tuple[str, int]) -> dict | None:
        return run_call(*item, target) if time.monotonic() < deadline else None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = [r for r in pool.map(call, order) if r is not None]
    per = {name: {"asked": count, "ran": sum(r["command"] == name for r in done),
                  "failed": sum(r["command"] == name and r["problem"] is not None for r in done),
                  "mean_s": _mean([r["s"] for r in done if r["command"] == name])} for name, count in calls.items()}
    failures = [r for r in done if r["problem"] is not None]
    return {"calls": per, "total_calls": len(done), "failures": failures, "seconds": time.perf_counter() - start}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store with a run of kept candidates (default: build one from grid-smoke)")
    parser.add_argument("--run", help="run id in --store (default: its latest)")
    parser.add_argument("--calls", default=DEFAULT_CALLS, help=f"command=count,... (default {DEFAULT_CALLS}); "
                        "bad = validate of a config with a misspelt key, which must exit 2; run = the grid-smoke "
                        "run again, all cache hits (needs a store built from grid-smoke)")
    parser.add_argument("--jobs", type=int, default=2, help="calls at once (default 2)")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="CPU-bound processes (default: cores)")
    parser.add_argument("--max-seconds", type=float, default=3600, help="start no call after this (default 3600)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        store = args.store or build_store(work)
        if "://" not in store:
            store = str(Path(store).resolve())  # the calls run in the work folder
        try:
            target = open_target(store, args.run, work)
        except SearchsvcError as err:  # a missing store or run: one line, as the CLI says it
            print(f"soak: {err}", file=sys.stderr)
            return 2
        load = start_load(args.load)
        try:
            result = soak(target, parse_calls(args.calls), args.jobs, args.max_seconds)
        finally:
            for proc in load:
                proc.kill()
    result.update(jobs=args.jobs, load_processes=args.load, cores=os.cpu_count())
    path = write_result(args.out, "soak", result)
    for name, row in result["calls"].items():
        print(f"{name:>9}: {row['ran']:4d} of {row['asked']:4d} calls, {row['failed']} failed, "
              f"mean {row['mean_s'] or 0:.2f} s")
    for failure in result["failures"][:10]:
        print(f"FAILED {failure['command']} #{failure['index']}: {failure['problem']}")
    print(f"{result['total_calls']} calls in {result['seconds']:.0f} s, {len(result['failures'])} failed: {path}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
