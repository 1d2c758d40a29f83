"""Data larger than a run may hold in memory, trained through `searchsvc run`: streamed against resident.

    python benchmarks/data_scale.py [--images 20000 --size 96 --times 4] [--out benchmarks/results]

Writes a JPEG image folder (10 classes; train, val and test) whose decoded size is `--times` what the run may hold
(`dataset.memory_share` set to that share of the memory available), then runs a grid search on it twice through
the CLI: on all of it with `in_memory: auto` (so it streams), and on a subset that fits with `in_memory: true` and
with `in_memory: false` (the same images: the speeds compare like with like). Each run trains a teacher
(`--teacher`, 2 epochs, in the driver) and one candidate (1 epoch, on a Ray worker). Recorded per run: its wall
time, the peak resident memory (VmHWM) of the driver and of every Ray worker and DataLoader process it started,
images per second of each teacher epoch and the share of it the steps waited for their batches (`data_wait_s`).
JSON:
data_scale.json (the figures of this machine; a GPU's belong in their own file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common

from storage import open_store

TEACHER = ["teacher.epochs=2", "teacher.batch_size=128", "teacher.augment=false"]
GRID = ["method=grid", "train.epochs=1", "train.batch_size=128", "train.augment=false",
        "search={round_to: 1, candidates: [{scale: 0.5}]}", "resources={gpus_per_eval: 0, cpus_per_eval: 1}"]


def _write_class(args: tuple[Path, int, int, int, int]) -> None:
    """`count` JPEGs of class `label` at `size` px: a class colour pattern plus noise (decoding costs what a photo's
    does; the content does not change the speed)."""
    import numpy as np
    from PIL import Image

    folder, label, count, size, seed = args
    folder.mkdir(parents=True, exist_ok=True)
    # the class's pattern, the same in every split (seeded by the label); the noise is the split's own
    pattern = np.kron(np.random.default_rng(label).integers(0, 255, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.normal(0, 40, (size, size, 3))
        Image.fromarray(np.clip(pattern + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def make_folder(root: Path, images: int, size: int) -> int:
    """The folder (kept if it is there): `images` training images, a tenth as many in val and test each; returns
    how many it holds."""
    counts = {"train": images // 10, "val": max(1, images // 100), "test": max(1, images // 100)}  # per class
    if not (root / "done").exists():
        jobs = [(root / split / f"c{label}", label, n, size, 1000 * i + label)
                for i, (split, n) in enumerate(counts.items()) for label in range(10)]
        with ProcessPoolExecutor(2) as pool:
            list(pool.map(_write_class, jobs))
        (root / "done").write_text("")
    return 10 * sum(counts.values())


class PeakMemory:
    """Polls /proc for the peak resident memory (VmHWM, MiB) of a process and every process under it."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peaks, self.names = pid, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            parents = {}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    except (OSError, ValueError, IndexError):
                        continue
            for pid in parents:
                up = pid
                while up in parents and up != self.pid:
                    up = parents[up]
                if up != self.pid:
                    continue
                try:
                    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except (OSError, ValueError):
                    continue
                peak = int(status.get("VmHWM", "0 kB").split()[0]) / 1024
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak)
                self.names[pid] = name[:60]
            time.sleep(0.5)

    def stop(self) -> dict[str, float]:
        """The peaks: the driver's, the largest Ray worker's and DataLoader process's, and how many of each."""
        self._stop.set()
        self._thread.join()
        workers = [mib for pid, mib in self.peaks.items() if self.names[pid].startswith("ray::")]
        loaders = [mib for pid, mib in self.peaks.items() if "python" in self.names[pid] and pid != self.pid]
        return {"driver_peak_mib": round(self.peaks.get(self.pid, 0.0), 1),
                "ray_worker_peak_mib": round(max(workers, default=0.0), 1), "ray_workers": len(workers),
                "other_python_peak_mib": round(max(loaders, default=0.0), 1), "other_python": len(loaders)}


def run(root: Path, store: Path, dataset: list[str], teacher: str) -> dict:
    """One `searchsvc run` on the folder: wall time, peak memory, the teacher's epochs (images/s, data wait)."""
    argv = [sys.executable, "-m", "searchsvc", "run", str(common.REPO / "configs" / "grid-smoke.yaml"), "--store",
            str(store), "--no-progress"]
    for item in [f"dataset={{name: imagefolder, root: {root}}}", *dataset, f"teacher.arch={teacher}", *TEACHER, *GRID]:
        argv += ["--set", item]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=common.REPO)
    memory = PeakMemory(proc.pid)
    out, err = proc.communicate()
    peaks = memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {err[-3000:]}")
    opened = open_store(str(store))
    run_id = sorted({k.split("/")[1] for k in opened.list("runs/")})[-1]
    record = opened.get_json(f"runs/{run_id}/run.json")
    meta = opened.get_json(f"teachers/{record['teacher_hash']}/meta.json")
    epochs = [{"images_per_s": round(e["images_per_s"], 1),
               "data_wait_share": round(e.get("data_wait_s", 0.0) / e["seconds"], 3)} for e in meta["history"]]
    return {"wall_s": round(time.perf_counter() - started, 1), **peaks, "data": record["data"],
            "teacher_epochs": epochs, "teacher_test_accuracy": meta["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20000, help="training images (val and test: a tenth each)")
    parser.add_argument("--size", type=int, default=96, help="image side, pixels")
    parser.add_argument("--times", type=float, default=4.0, help="decoded data / what the run may hold")
    parser.add_argument("--subset", type=int, default=4000, help="training images of the like-for-like runs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader processes per training process")
    parser.add_argument("--teacher", default="tiny_cnn", help="zoo teacher (tiny_cnn: decoding is the bottleneck)")
    parser.add_argument("--folder", default="/tmp/searchsvc-data-scale", help="where the images are written")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    from workers.data.streaming import available_memory

    root = Path(args.folder) / f"{args.images}-{args.size}px"
    started = time.perf_counter()
    count = make_folder(root, args.images, args.size)
    decoded = count * 3 * args.size ** 2
    available = available_memory()
    share = decoded / args.times / available
    print(f"{count} images, {decoded / 2**20:.0f} MiB decoded; the run may hold {decoded / args.times / 2**20:.0f} "
          f"MiB (memory_share {share:.4f} of {available / 2**20:.0f} MiB)", flush=True)
    result = {"benchmark": "data_scale", "images": count, "size": args.size, "decoded_mib": round(decoded / 2**20),
              "available_mib": round(available / 2**20), "memory_share": share,
              "may_hold_mib": round(decoded / args.times / 2**20),
              "make_folder_s": round(time.perf_counter() - started),
              "workers": args.workers, "teacher": args.teacher, "runs": {}}
    common_sets = [f"dataset.image_size={args.size}", f"dataset.workers={args.workers}"]
    plans = {"all_auto": [f"dataset.memory_share={share}", "dataset.in_memory=auto"],
             "subset_in_memory": [f"dataset.subset={args.subset}", "dataset.in_memory=true"],
             "subset_streamed": [f"dataset.subset={args.subset}", "dataset.in_memory=false"]}
    for name, sets in plans.items():
        store = Path(args.folder) / f"store-{name}"
        subprocess.run(["rm", "-rf", str(store)], check=True)  # a fresh store: the teacher trains in each run
        result["runs"][name] = run(root, store, [*common_sets, *sets], args.teacher)
        print(name, json.dumps(result["runs"][name]), flush=True)
    print(common.write_result(args.out, "data_scale", result))


if __name__ == "__main__":
    main()
