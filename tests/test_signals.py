"""Issue 21, class 6: SIGTERM — sent to the whole process group, as `timeout` and batch schedulers do — leaves
the run `stopped` and resumable whenever it lands: during teacher training, Ray's start-up (whose own daemons
die of the same signal)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import REPO

GRID = REPO / "configs" / "grid-smoke.yaml"
# When to send the signal: a line the run logs, or a state of its store.
PHASES: dict[str, Callable[[list[str], Path], bool]] = {
    "teacher training": lambda lines, store: any("training teacher" in line for line in lines),
    "ray start-up": lambda lines, store: any("trained in" in line for line in lines),
}  # during the search: tests/test_job.py stops a run with `ray job stop` (SIGTERM) mid-search


def _term_when(store: Path, ready: Callable[[list[str], Path], bool]) -> subprocess.CompletedProcess:
    """`searchsvc run` in a session of its own; SIGTERM to the whole session once `ready`, then wait."""
    command = [sys.executable, "-m", "searchsvc", "run", str(GRID), "--store", str(store), "--no-progress",
               "--set", "teacher.epochs=3", "--set", "search.candidates=[{}, {scale: 0.5}]"]  # resume: 2 to train
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True, env={**os.environ, "RAY_ADDRESS": ""})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(driver.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and driver.poll() is None and not ready(lines, store):
        time.sleep(0.05)
    assert driver.poll() is None, "the run ended before the signal: " + "".join(lines[-5:])
    os.killpg(driver.pid, signal.SIGTERM)
    driver.wait(timeout=180)
    reader.join(timeout=10)  # the pipe's last lines, once the process (and Ray's, holding it open) are gone
    return subprocess.CompletedProcess(command, driver.returncode, "", "".join(lines))


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_sigterm_at_any_moment_leaves_the_run_stopped(tmp_path: Path, phase: str):
    store = tmp_path / "store"
    done = _term_when(store, PHASES[phase])
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].endswith("`searchsvc resume` continues the run"), done.stderr[-3000:]
    (run,) = (store / "runs").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "stopped", record
    if phase == "ray start-up":  # the hardest moment: Ray's daemons died with the driver's signal
        resumed = subprocess.run([sys.executable, "-m", "searchsvc", "resume", "--store", str(store), "--run",
                                  run.name, "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
