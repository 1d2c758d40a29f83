"""benchmarks/gpu_check.py: the GPU check that needs only torch, run here in its CPU tiny mode with Ray,
boto3 and gymnasium made unimportable (as on the bare GPU machine it is written for)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECK = REPO / "benchmarks" / "gpu_check.py"
HIDDEN = ("ray", "boto3", "botocore", "gymnasium", "torch_pruning")


def bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a machine without Ray, boto3, gymnasium or torch-pruning: a sitecustomize that
    makes importing them fail, in this process's children too (the check's worker processes)."""
    site = tmp_path / "bare"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HIDDEN))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), **extra}


def test_the_environment_really_hides_ray_boto3_and_gymnasium(tmp_path):
    env = bare_env(tmp_path)
    for name in HIDDEN:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, name


def test_cpu_tiny_check_runs_every_part_without_ray_boto3_or_gymnasium(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(out), "--device", "cpu", "--tiny"],
                          env=bare_env(tmp_path), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import sizes

    tiny = sizes(True)  # the sizes the check ran at
    assert set(results) == {"gpu_tests", "sync_check", "epoch_time", "candidates_per_hour"}
    for record in results.values():  # every figure says where and when it was taken
        assert record["ok"] is True and record["device_name"] == "cpu" and record["torch"] and record["date"]
    assert results["gpu_tests"]["ran"] is False and "CUDA-only" in results["gpu_tests"]["reason"]
    sync = results["sync_check"]["variants"]
    assert set(sync) == {"cached", "live"} and all(v["ok"] and v["steps_watched"] > 0 for v in sync.values())
    epoch = results["epoch_time"]
    for teacher in ("cached", "live"):  # ours and both plain loops ran, timed
        figures = epoch[teacher]
        assert figures["images"] == tiny["images"] and figures["ours_epoch_s"] > 0
        assert figures["plain_matched_epoch_s"] > 0 and figures["plain_epoch_s"] > 0
    assert epoch["live"]["gflops_per_image"] > epoch["cached"]["gflops_per_image"]  # the teacher's forward counts
    pool = results["candidates_per_hour"]["resnet20"]
    assert [run["processes"] for run in pool["runs"]] == [1, 2]
    assert all(run["ok"] == run["candidates"] == tiny["candidates"] and run["candidates_per_hour"] > 0
               for run in pool["runs"])
    assert pool["packing_gain"]["1"] == 1.0
    assert pool["eager_runs"] == [] and pool["graph_gain"] == {}  # the eager baseline is a GPU figure
    table = proc.stdout[proc.stdout.index("figure"):]
    assert "resnet20 candidates per hour (1/2 processes)" in table and "no host sync" in table


def test_without_cuda_the_check_stops_at_once_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path / "out")],
                          env=bare_env(tmp_path, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "CUDA is not available" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_part_is_named(tmp_path):
    proc = subprocess.run([sys.executable, str(CHECK), "--out", str(tmp_path / "out"), "--only", "sync,epochs"],
                          env=bare_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "gpu_check: --only: unknown part 'epochs'; choose from tests, sync, epoch, pool")


def test_the_pool_figures_divide_like_counts():
    """Packing gain: each count over one process, both graphed; graph gain: graphed over eager, same count."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_check import _pool_figures

    graphed = [{"processes": 1, "candidates_per_hour": 100.0}, {"processes": 4, "candidates_per_hour": 150.0}]
    eager = [{"processes": 1, "candidates_per_hour": 80.0}, {"processes": 4, "candidates_per_hour": 120.0}]
    figures = _pool_figures(graphed, eager)
    assert figures["packing_gain"] == {"1": 1.0, "4": 1.5}
    assert figures["graph_gain"] == {"1": 1.25, "4": 1.25} and figures["best_per_hour"] == 150.0
