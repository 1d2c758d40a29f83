"""Each benchmark runs in a tiny mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent

# (script, arguments of its tiny mode, keys its JSON must have > 0), the longest first
CASES = [
    ("n2n_agents.py", ["--seeds", "0", "--budgets", "4", "--iteration", "4", "--config", "configs/n2n-smoke.yaml",
                       "--set", "teacher.epochs=1", "--set", "dataset.synthetic.train_size=256"], ["budget"]),
    ("evals_per_hour.py", ["--teacher", "tiny_cnn", "--images", "256", "--batch", "64", "--candidates", "1",
                           "--shares", "0.5"], ["best_evals_per_hour"]),  # 2 actors: the packed layout
    ("scaling.py", ["--nodes", "1,2", "--per-node", "2", "--cost-s", "0.2"], ["speedup_max_nodes", "efficiency_max_nodes"]),
    ("driver_overhead.py", ["--budget", "4", "--iteration", "2", "--teacher", "tiny_cnn", "--images", "256"],
     ["mean_eval_s", "overhead_median_ms", "overhead_fraction"]),
    ("pool_overhead.py", ["--candidates", "1", "--train-size", "256"], ["in_process_s_per_eval", "pool_s_per_eval"]),
    ("rigl_fashion.py", ["--arch", "mlp_32", "--distribution", "erk", "--include-linear", "--epochs", "1", "--images",
                         "640", "--delta", "3", "--seeds", "1"], ["rigl_mean_accuracy", "static_mean_accuracy"]),
    ("epoch_time.py", ["--arch", "tiny_cnn", "--images", "128", "--batch", "32", "--workers", "0", "--device", "cpu"],
     ["ours_epoch_s", "plain_matched_epoch_s", "speedup_loop_only", "plain_epoch_s", "speedup_vs_plain",
      "achieved_tflops"]),
    ("layer_latency.py", ["--batch", "2"], ["int8_speedup_thinnest", "int8_speedup_widest"]),
    ("store_throughput.py", ["--mb", "2", "--small", "5"], ["put_mb_per_s", "get_mb_per_s", "small_json_writes_per_s"]),
    ("train_throughput.py", ["--arch", "tiny_cnn", "--batch", "8", "--size", "16", "--steps", "2", "--device", "cpu"],
     ["channels_last_images_per_s", "contiguous_images_per_s", "channels_last_speedup"]),
]


@pytest.fixture(scope="module")
def tiny_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    """The selected tiny modes, two at a time: each is mostly its process's imports and Ray's start-up,
    which overlap on 2 cores (all nine: 143 s, against about 190 s one after another). Script → its future."""
    selected = {item.callspec.params["script"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}

    def run(script: str, args: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
        out = tmp_path_factory.mktemp(script.removesuffix(".py"))
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                              capture_output=True, text=True, cwd=REPO, timeout=300)
        return done, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {script: pool.submit(run, script, args) for script, args, _ in CASES if script in selected}


# Slow (not in `make test`): n2n_agents is two N2N searches, PPO and random, whose paths test_n2n.py runs
# end to end (the PPO smoke run, the random agent's budget); only its comparison of the two is left out.
# driver_overhead is one N2N search with PPO (test_n2n.py's PPO smoke run) and the gaps between the stored
# evaluations' start and end times; only that arithmetic is left out.
SLOW = {"n2n_agents.py", "driver_overhead.py"}


@pytest.mark.parametrize("script, args, keys", [
    pytest.param(*case, id=case[0], marks=[pytest.mark.slow] if case[0] in SLOW else []) for case in CASES])
def test_benchmark_tiny_mode_writes_json(tiny_runs, script, args, keys):
    done, out = tiny_runs[script].result()
    assert done.returncode == 0, done.stderr
    (written,) = out.glob(script.replace(".py", "*.json"))  # some name the device or model in the file
    result = json.loads(written.read_text())
    for key in keys:
        assert result[key] > 0
    assert result["code_version"] and result["date"]


def test_code_version_is_dirty_for_changed_code_not_for_benchmark_results(tmp_path):
    """A benchmark's JSON written into the checkout used to mark every later JSON of `make bench` '-dirty'.
    A checkout of its own: this package's version.py, a code file and a tracked result, committed."""
    clone = tmp_path / "checkout"
    (clone / "searchsvc").mkdir(parents=True)
    (clone / "benchmarks" / "results").mkdir(parents=True)
    (clone / "searchsvc" / "__init__.py").write_text("")
    (clone / "searchsvc" / "version.py").write_text((REPO / "searchsvc" / "version.py").read_text())
    (clone / "benchmarks" / "results" / "soak.json").write_text("{}\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    def version() -> str:
        code = "from searchsvc.version import code_version; print(code_version())"
        env = {"PYTHONPATH": str(clone), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-c", code], cwd=clone, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    commit = git("rev-parse", "--short=12", "HEAD")
    assert version() == commit
    (clone / "benchmarks" / "results" / "soak.json").write_text('{"calls": 1}\n')  # a tracked result, rewritten
    (clone / "benchmarks" / "results" / "new.json").write_text("{}\n")
    assert version() == commit
    with open(clone / "searchsvc" / "version.py", "a") as handle:
        handle.write("# changed\n")
    assert version() == commit + "-dirty"


def test_n2n_landscape_fills_a_table_then_replays_the_agents_on_it(tmp_path):
    """Issue 38's agent comparison at many seeds: every removal of tiny_cnn (2 blocks, 4 networks) distilled once,
    then PPO, PPO from a transferred policy and random search on that table, each within its budget."""
    def bench(*args: str) -> None:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "n2n_landscape.py"), *args, "--out",
                               str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    bench("fill", "--name", "tiny", "--config", "configs/n2n-smoke.yaml", "--set", "dataset.subset=null", "--set",
          "teacher.epochs=1", "--set", "dataset.synthetic.train_size=256")
    landscape = json.loads((tmp_path / "n2n_landscape_tiny.json").read_text())
    assert landscape["blocks"] == ["layer1.0", "layer2.0"] and landscape["candidates"] == 4
    assert sorted(landscape["table"]) == ["", "layer1.0", "layer1.0|layer2.0", "layer2.0"]
    assert all(entry["status"] == "ok" and entry["compression"] >= 1 for entry in landscape["table"].values())
    assert landscape["table"]["layer1.0|layer2.0"]["compression"] > landscape["table"]["layer1.0"]["compression"]
    bench("compare", "--name", "tiny", "--source", "tiny", "--budgets", "2", "--seeds", "0", "1", "--iteration", "2",
          "--temperature", "2")
    result = json.loads((tmp_path / "n2n_agents_table_tiny.json").read_text())
    optimum = max(e["reward"] for e in landscape["table"].values() if e["status"] == "ok")
    assert result["optimum"] == optimum and result["code_version"]
    runs = result["results"]["2"]["runs"]
    assert set(runs) == {"ppo", "ppo_transfer", "random"}
    for agent in runs.values():
        for run in agent.values():
            curve = run["best_after_each"]
            assert 1 <= run["evaluations"] == len(curve) <= 2 and curve == sorted(curve) and run["reward"] == curve[-1]
    assert set(result["results"]["2"]["ppo_vs_random"]) == {"wins", "ties", "losses"}
