"""searchsvc as a Ray job on a running cluster, as a user runs it: `ray start --head` (token auth, loopback
only) on free ports in a temp dir, `ray job submit` of the grid smoke config with the store on the S3 test
server, `ray job stop` mid-run, a driver killed with SIGKILL, and what every log and stored file holds
about the keys. Only the processes a test started are stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from storage import S3Store
from tests.conftest import REPO, S3Server, _bindable

pytestmark = pytest.mark.s3  # its Ray cluster runs in processes of its own: not `cluster`
BIN = Path(sys.executable).parent
GRID = "configs/grid-smoke.yaml"


_HANDED_OUT: set[int] = set()  # ports given to a node of this module's clusters (not bound until it starts)


def free_ports(count: int) -> list[int]:
    """`count` free ports in a range of their own (worker ports are a span after the last), never handed out twice."""
    ports: list[int] = []
    for port in range(46000 + os.getpid() % 40 * 100, 60000):
        if port not in _HANDED_OUT and _bindable(port):
            ports.append(port)
            _HANDED_OUT.add(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports")


@dataclass
class RayHead:
    """A Ray cluster started with `ray start --head --block` (its own temp dir and ports)."""

    address: str  # the job server: http://127.0.0.1:<dashboard port>
    gcs: str  # 127.0.0.1:<port>, for `ray start --address` and drivers
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE and the token
    processes: list[subprocess.Popen]
    temp_dir: Path

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=env or self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        for process in reversed(self.processes):  # killing a --block process stops that node's processes
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=3)  # a --block head can linger after SIGTERM: its group is killed
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def node_args(temp_dir: Path) -> list[str]:
    """Every port a node opens, free and on loopback, so two clusters on one machine do not collide."""
    manager, objects, client, agent, agent_grpc, metrics, runtime_env, low = free_ports(8)
    _HANDED_OUT.update(range(low, low + 61))  # the worker ports span after the last
    return ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", f"--temp-dir={temp_dir}",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}", f"--min-worker-port={low + 1}",
            f"--max-worker-port={low + 60}"]


@pytest.fixture(scope="module")
def head(s3_server: S3Server) -> Iterator[RayHead]:
    """A two-node cluster (head + one worker, 1 CPU each) with token auth, the S3 keys in the nodes'
    environment (as an instance role would provide them)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{BIN}:{env.get('PATH', '')}")
    node_env = {**env, "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}
    port, dashboard = free_ports(2)
    cluster = RayHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", env, [], temp_dir)
    start = [str(BIN / "ray"), "start"]
    cluster.processes.append(subprocess.Popen(
        [*start, "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         *node_args(temp_dir)], env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True))
    try:
        wait_for(lambda: cluster.ray("job", "list", "--address", cluster.address, timeout=30).returncode == 0, 90)
        # A folder of its own, as a second machine has: a node's runtime-env agent deletes the job's working_dir
        # package when its own workers no longer use it, and a shared folder is the driver's working directory.
        cluster.processes.append(subprocess.Popen(
            [*start, f"--address={cluster.gcs}", *node_args(temp_dir / "w")], env=node_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        yield cluster
    finally:
        cluster.stop()


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.5)


def submit(head: RayHead, store_uri: str, endpoint: str, *sets: str, no_wait: bool = False,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ray job submit` exactly as the README has it (plus the venv's python, see DESIGN)."""
    extra = [arg for item in sets for arg in ("--set", item)]
    return head.ray("job", "submit", "--address", head.address, "--runtime-env-json", '{"working_dir": "."}',
                    *(["--no-wait"] if no_wait else []), "--",
                    sys.executable, "-m", "searchsvc", "run", GRID, "--store", store_uri, "--s3-endpoint", endpoint,
                    "--no-progress", *extra, env=env)


def open_bucket(s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    return S3Store(bucket, "jobs", endpoint=s3_server.endpoint)


def only_run(store: S3Store) -> str:
    runs = sorted({k.split("/")[1] for k in store.list("runs/")})
    assert len(runs) == 1, runs
    return runs[0]


def test_ray_job_submit_runs_the_search_and_keeps_keys_out_of_logs_and_store(head, s3_server, monkeypatch):
    bucket = s3_server.new_bucket()
    result = submit(head, f"s3://{bucket}/jobs", s3_server.endpoint)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logs = result.stdout + result.stderr
    assert "succeeded" in logs.lower()
    assert "5 evaluations" in logs and "searchsvc results --store" in logs  # the job's log: the run and its table
    store = open_bucket(s3_server, bucket, monkeypatch)
    run_id = only_run(store)
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "finished"
    assert store.get_table(f"runs/{run_id}/results.parquet").num_rows == 5
    # `searchsvc results` reads the job's run from anywhere that reaches the store
    shown = subprocess.run([sys.executable, "-m", "searchsvc", "results", "--store", f"s3://{bucket}/jobs",
                            "--s3-endpoint", s3_server.endpoint, "--run", run_id, "--json"],
                           capture_output=True, text=True, env={**os.environ}, cwd=REPO)
    assert shown.returncode == 0 and len(json.loads(shown.stdout)) == 5
    # the keys are in the nodes' environment only: not in the job's log, Ray's logs, or anything stored
    secrets_seen = [s3_server.secret_key, s3_server.access_key, head.env["RAY_AUTH_TOKEN"]]
    ray_logs = [p for p in head.temp_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    assert ray_logs
    for text in [logs, *(p.read_text(errors="replace") for p in ray_logs),
                 *(store.get_bytes(k).decode(errors="replace") for k in store.list())]:
        for secret in secrets_seen:
            assert secret not in text


def test_a_client_without_the_token_is_refused(head, s3_server):
    no_token = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"}
    wrong = {**head.env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    for env in (no_token, wrong):
        result = head.ray("job", "list", "--address", head.address, env=env, timeout=60)
        assert result.returncode != 0
        assert "401" in result.stdout + result.stderr or "auth" in (result.stdout + result.stderr).lower()


def test_ray_job_stop_leaves_a_consistent_store_that_resume_completes(head, s3_server, monkeypatch, tmp_path):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/jobs"
    result = submit(head, uri, s3_server.endpoint, "train.epochs=20", no_wait=True)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = next(w.strip("'\"") for line in result.stdout.splitlines() for w in line.split() if w.startswith(
        ("'raysubmit_", "raysubmit_")))
    store = open_bucket(s3_server, bucket, monkeypatch)
    wait_for(lambda: any("/evals/" in k for k in store.list("runs/")), 240)
    stopped = head.ray("job", "stop", "--address", head.address, job_id)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    def status() -> str:
        shown = head.ray("job", "status", "--address", head.address, job_id)
        return shown.stdout + shown.stderr

    seen: list[str] = []
    try:
        wait_for(lambda: seen.append(status()) or "was stopped" in seen[-1], 60)
    except AssertionError:
        raise AssertionError(seen[-1][-3000:]) from None
    run_id = only_run(store)
    try:
        wait_for(lambda: store.get_json(f"runs/{run_id}/run.json")["status"] == "stopped", 30)
    except AssertionError:
        shown = head.ray("job", "logs", "--address", head.address, job_id)
        raise AssertionError((shown.stdout + shown.stderr)[-4000:]) from None
    rows = [store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")]
    table = store.get_table(f"runs/{run_id}/results.parquet")  # flushed on the way out
    assert sorted(table.column("spec_hash").to_pylist()) == sorted(r["spec_hash"] for r in rows)
    assert len(rows) < 5
    report = tmp_path / "resumed.html"  # `resume --report`, as `run --report`: the report of the whole run
    resumed = subprocess.run([sys.executable, "-m", "searchsvc", "resume", "--store", uri, "--s3-endpoint",
                              s3_server.endpoint, "--run", run_id, "--no-progress", "--report", str(report)],
                             capture_output=True, text=True, env={**os.environ, **head.env, "RAY_ADDRESS": head.gcs},
                             cwd=REPO, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_id in report.read_text() and report.read_text().rstrip().endswith("</html>")
    evals = [store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")]
    trained = [e["spec_hash"] for e in evals if not e["cached"]]
    assert len(evals) == 5 and len(trained) == len(set(trained))
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "finished"


# Slow (not in `make test`): resume on a live cluster is the `ray job stop` test above; a SIGKILLed driver
# (no end written, resumed without repeats) is test_n2n's kill -9 (the actor pool) and test_taylor's (Tune).
@pytest.mark.slow
def test_driver_killed_with_sigkill_on_the_cluster_is_resumed_without_repeats(head, s3_server, monkeypatch):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/jobs"
    store = open_bucket(s3_server, bucket, monkeypatch)  # the keys in this process's environment
    env = {**os.environ, **head.env, "RAY_ADDRESS": head.gcs}  # a driver on the head node, as `ray job` runs it
    command = [sys.executable, "-m", "searchsvc", "run", GRID, "--store", uri, "--s3-endpoint", s3_server.endpoint,
               "--no-progress", "--set", "train.epochs=20"]
    driver = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: driver.poll() is not None or any("/evals/" in k for k in store.list("runs/")), 240)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
    finally:
        driver.kill()
        driver.wait()
    run_id = only_run(store)
    before = {k: store.get_bytes(k) for k in store.list(f"runs/{run_id}/evals/")}
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "running"  # nothing wrote an end
    resumed = subprocess.run([sys.executable, "-m", "searchsvc", "resume", "--store", uri, "--s3-endpoint",
                              s3_server.endpoint, "--run", run_id, "--no-progress"], capture_output=True, text=True,
                             env=env, cwd=REPO, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key, data in before.items():
        assert store.get_bytes(key) == data  # recorded results untouched
    evals = [store.get_json(k) for k in store.list(f"runs/{run_id}/evals/")]
    trained = [e["spec_hash"] for e in evals if not e["cached"]]
    assert len(evals) == 5 and len(trained) == len(set(trained))  # none lost, none trained twice
    assert store.get_json(f"runs/{run_id}/run.json")["status"] == "finished"
