"""Issue 34: infrastructure faults end in one line and a resumable run. A Tune trial's worker SIGKILLed is
retried from its checkpoint until `max_failures` runs out; Ray's memory monitor killing the pool's actors
(real: RAY_memory_usage_threshold below what the machine uses) is retried up to the pool's bound. Then the
CLI prints one line naming the cause and the `searchsvc resume` that continues the run (exit 75), and that
resume finishes it. Each evaluation asks Ray for its memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.exceptions import ActorDiedError, OutOfMemoryError, RayActorError, RayTaskError
from ray.tune.error import TuneError

import searchsvc
from core.errors import SearchsvcError
from searchsvc.cli import main
from searchsvc.config import ConfigError, parse_config
from searchsvc.running.faults import EXIT_CODE, describe, ray_fault, run_failed
from storage import LocalStore
from tests.conftest import REPO
from workers.evaluation.pool import default_pool_size, ray_resources
from workers.evaluation.resources import MIB, Resources

# Both runs below train the same one-epoch tiny_cnn teacher on the same synthetic data: one store, trained once.
TEACHER = ["teacher.epochs=1"]
SWEEP = ["train.epochs=8", "search.tune={distribution: [uniform], grace_period: 8, max_failures: 1}"]
OOM_MESSAGE = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 10.0.0.1, "
               "ID: abc) was 21.3GB used / 23.59GB limit (0.9)\nOOM kill reason: Memory usage exceeded threshold")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-faults") / "store"


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _runs(store: Path) -> set[str]:
    return {p.name for p in (store / "runs").iterdir()} if (store / "runs").exists() else set()


def _record(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / run_id / "run.json").read_text())


def _one_error_line(stderr: str) -> str:
    """The CLI's own error, checked to be one line, the last, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("searchsvc: error:")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0]


def _trial_workers() -> list[int]:
    """Pids of this process's Ray workers running a Tune trial (Ray titles them after the trainable's actor)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"ray::ImplicitFunc" not in (entry / "cmdline").read_bytes():
                continue
            parent = int(entry.name)
            while parent > 1 and parent != os.getpid():  # the session's Ray: started by this process
                parent = int((Path("/proc") / str(parent) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid():
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _newest_checkpoint_epoch(store: Path) -> int:
    epochs = [-1]
    for path in store.glob("runs/*/state/**/train_state.pt"):
        try:
            epochs.append(int(torch.load(path, weights_only=True)["epoch"]))
        except Exception:  # noqa: BLE001 — still being written
            continue
    return max(epochs)


def _kill_trial_workers(store: Path, times: int, done: threading.Event, killed: list[tuple[int, int]]) -> None:
    """SIGKILL the trial's worker `times` times, each once it has stored a checkpoint newer than the last kill's:
    (pid, epoch) of each kill in `killed`."""
    last = -1
    while len(killed) < times and not done.is_set():
        epoch = _newest_checkpoint_epoch(store)
        workers = [pid for pid in _trial_workers() if pid not in {p for p, _ in killed}]
        if epoch > last and workers:
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            killed.append((workers[0], epoch))
            last = epoch
        time.sleep(0.05)


def test_a_trial_worker_killed_past_max_failures_ends_in_one_line_and_resume_finishes_it(
        ray_session, store_dir, capsys):
    """max_failures: 1. The first SIGKILL: Tune restarts the trial from its checkpoint. The second: the run
    fails, the CLI says so in one line with the resume command; resume restores the trial from its checkpoint
    and finishes, no epoch redone but one whose checkpoint was in flight."""
    before = _runs(store_dir)
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_trial_workers, args=(store_dir, 2, done, killed), daemon=True)
    killer.start()
    try:
        code = main(["run", str(REPO / "configs" / "rigl-smoke.yaml"), "--store", str(store_dir), "--no-progress",
                     *_sets(*TEACHER, *SWEEP)])
    finally:
        done.set()
        killer.join(timeout=10)
    (run_id,) = _runs(store_dir) - before
    line = _one_error_line(capsys.readouterr().err)
    assert len(killed) == 2 and killed[0][0] != killed[1][0] and killed[1][1] > killed[0][1], killed
    assert code == EXIT_CODE, line
    uri = LocalStore(store_dir).uri
    assert "worker process died" in line and f"`searchsvc resume --store {uri} --run {run_id}`" in line, line
    record = _record(store_dir, run_id)
    assert record["status"] == "failed" and record["error"] == f"RunFailed: {line.split('error: ', 1)[1]}"

    assert main(["resume", "--store", str(store_dir), "--run", run_id, "--no-progress"]) == 0
    assert _record(store_dir, run_id)["status"] == "finished"
    (row,) = searchsvc.results(LocalStore(store_dir), run_id).to_pylist()
    assert row["status"] == "ok"
    history = [epoch for path in (store_dir / "runs" / run_id).glob("state/**/result.json")
               for text in path.read_text().splitlines() if text.strip()
               if (epoch := json.loads(text).get("epoch")) is not None]
    # Restored, not redone: every epoch reported, in order, and each restart redoes at most the one epoch whose
    # checkpoint was in flight (Tune logs a result before its separate `save` task registers the checkpoint; a
    # worker killed in between restarts from the checkpoint before). From scratch would redo every epoch.
    assert sorted(set(history)) == list(range(1, 9)) and history == sorted(history), history
    assert len(history) <= 8 + len(killed), (history, killed)


def test_ray_memory_monitor_killing_every_pool_worker_ends_in_one_line_and_resume_finishes_it(
        ray_session, store_dir):
    """A Ray whose memory monitor threshold (0.1 % of the node) is below what the machine uses kills every
    evaluation worker: the pool retries on fresh ones, then the run fails in one line naming the memory and the
    resume command. Resumed on a Ray with room, the run finishes."""
    before = _runs(store_dir)
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0", "RAY_memory_usage_threshold": "0.001",
           "RAY_memory_monitor_refresh_ms": "100"}
    command = [sys.executable, "-m", "searchsvc", "run", str(REPO / "configs" / "grid-smoke.yaml"), "--store",
               str(store_dir), "--no-progress",
               *_sets(*TEACHER, "search.candidates=[{scale: 0.5}]", "resources.max_concurrent=1")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=240)
    (run_id,) = _runs(store_dir) - before
    line = _one_error_line(done.stderr)
    assert done.returncode == EXIT_CODE, done.stderr[-3000:]
    uri = LocalStore(store_dir).uri
    assert "memory monitor" in line and f"`searchsvc resume --store {uri} --run {run_id}`" in line, line
    assert _record(store_dir, run_id)["status"] == "failed"

    assert main(["resume", "--store", str(store_dir), "--run", run_id, "--no-progress"]) == 0
    assert _record(store_dir, run_id)["status"] == "finished"
    (row,) = searchsvc.results(LocalStore(store_dir), run_id).to_pylist()
    assert row["status"] == "ok"


def test_ray_faults_are_found_behind_the_errors_that_carry_them():
    """RLlib raises a RuntimeError from the env step's error; Tune keeps an OOM kill as text; a task's own error
    and an actor whose __init__ raised are not the infrastructure's."""
    oom = OutOfMemoryError(OOM_MESSAGE)
    try:
        try:
            raise oom
        except OutOfMemoryError as err:
            raise RuntimeError("Environment step failed") from err
    except RuntimeError as wrapped:
        assert ray_fault(wrapped) is oom
    assert describe(oom) == ("Ray's memory monitor killed a worker: the node ran out of memory "
                             "(21.3GB used / 23.59GB limit) (OutOfMemoryError)")
    text = TuneError(f"Failure # 2 (occurred at 2026-01-01)\n{OOM_MESSAGE}\n")
    assert "ran out of memory" in describe(ray_fault(text))
    assert "worker process died" in describe(ray_fault(ActorDiedError()))
    assert ray_fault(RayTaskError("evaluate", "trace", oom)) is oom  # a task's cause decides
    assert ray_fault(RayTaskError("evaluate", "trace", ValueError("shapes"))) is None
    assert ray_fault(RayActorError(error_msg="__init__ raised", actor_init_failed=True)) is None
    assert ray_fault(SearchsvcError("dataset.root: no such folder")) is None
    assert run_failed(RuntimeError("step"), "file:///s", "r1") is None  # no Ray error behind it
    failed = run_failed(oom, "s3://bucket/prefix", "20260101-000000.000-abcdef")
    assert isinstance(failed, SearchsvcError) and failed.exit_code == EXIT_CODE and "\n" not in str(failed)
    assert str(failed).endswith("`searchsvc resume --store s3://bucket/prefix --run 20260101-000000.000-abcdef` "
                                "continues it")


def test_each_evaluation_asks_ray_for_its_memory_and_the_pool_fits_the_cluster_memory(ray_session):
    node_memory = max(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"])
    third = int(node_memory // 3 // MIB)
    assert ray_resources(Resources(cpus_per_eval=1, memory_per_eval=300)) == {"CPU": 1, "GPU": 0,
                                                                              "memory": 300 * MIB}
    assert "memory" not in ray_resources(Resources(memory_per_eval=None))
    assert ray_resources(Resources(memory_per_eval=int(node_memory // MIB) * 2))["memory"] == node_memory  # capped
    assert default_pool_size(Resources(cpus_per_eval=0.01, memory_per_eval=third)) == 3  # by memory, not by CPU


def test_memory_per_eval_must_be_a_positive_number_of_mib():
    with pytest.raises(ConfigError, match="resources.memory_per_eval"):
        parse_config({"method": "grid", "resources": {"memory_per_eval": 0}})
    assert parse_config({"method": "grid", "resources": {"memory_per_eval": 2048}}).resources.memory_per_eval == 2048
