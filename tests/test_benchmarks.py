"""Each benchmark runs in a tiny mode and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script, args, keys", [
    ("epoch_time.py", ["--arch", "tiny_cnn", "--images", "128", "--batch", "32", "--workers", "0", "--device", "cpu"],
     ["ours_epoch_s", "plain_epoch_s", "speedup_vs_plain", "achieved_tflops"]),
    ("evals_per_hour.py", ["--teacher", "tiny_cnn", "--images", "256", "--batch", "64", "--candidates", "1",
                           "--shares", "1", "0.5"], ["best_evals_per_hour"]),
    ("driver_overhead.py", ["--budget", "4", "--iteration", "2", "--teacher", "tiny_cnn", "--images", "256"],
     ["mean_eval_s", "overhead_median_ms", "overhead_fraction"]),
    ("train_throughput.py", ["--arch", "tiny_cnn", "--batch", "8", "--size", "16", "--steps", "2", "--device", "cpu"],
     ["channels_last_images_per_s", "contiguous_images_per_s", "channels_last_speedup"]),
    ("store_throughput.py", ["--mb", "2", "--small", "5"], ["put_mb_per_s", "get_mb_per_s", "small_json_writes_per_s"]),
    ("pool_overhead.py", ["--candidates", "1", "--train-size", "256"], ["in_process_s_per_eval", "pool_s_per_eval"]),
    ("scaling.py", ["--nodes", "1,2", "--per-node", "2", "--cost-s", "0.2"], ["speedup_max_nodes", "efficiency_max_nodes"]),
    ("rigl_fashion.py", ["--arch", "mlp_32", "--distribution", "erk", "--include-linear", "--epochs", "1", "--images",
                         "640", "--delta", "3", "--seeds", "1"], ["rigl_mean_accuracy", "static_mean_accuracy"]),
    ("n2n_agents.py", ["--seeds", "0", "--budget", "4", "--iteration", "4", "--teacher-epochs", "1", "--train-size",
                       "256"], ["budget"]),
])
def test_benchmark_tiny_mode_writes_json(tmp_path, script, args, keys):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    (written,) = tmp_path.glob(script.replace(".py", "*.json"))  # some name the device or model in the file
    result = json.loads(written.read_text())
    for key in keys:
        assert result[key] > 0
    assert result["code_version"] and result["date"]
