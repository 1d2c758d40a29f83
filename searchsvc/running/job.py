"""One search job from start to end: store → run record → data → teacher → the method's driver → results.

    runs/<run_id>/config.yaml      the resolved config, written first and once
    runs/<run_id>/run.json         status, teacher, counts and timings, rewritten as the run goes
    runs/<run_id>/results.parquet  the consolidated table
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from core.errors import SearchsvcError, first_line
from searchsvc.config import JobConfig, config_to_yaml, parse_config
from searchsvc.methods import get_method
from searchsvc.reporting.rows import ResultRow
from searchsvc.reporting.table import stored_config, write_results
from searchsvc.running import stopping
from searchsvc.running.faults import run_failed
from searchsvc.running.preflight import check_device, check_ray_address, check_resources
from searchsvc.running.stopping import Stopped, stop_on_sigterm
from searchsvc.version import code_version
from storage import ArtifactStore, KeyNotFoundError, StoreOptions, StoreUnreachableError, layout, open_store, spool
from storage.base import sealed
from workers.data.datasets import Splits, load_dataset
from workers.evaluation.resources import with_memory, workers_on_gpu
from workers.evaluation.spec import Builder
from workers.training.teacher import Teacher, load_or_train_teacher
from workers.training.train import resolve_device

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a driver gets: the config, the store, the run id, the data and the trained teacher."""

    config: JobConfig
    store: ArtifactStore
    run_id: str
    splits: Splits
    teacher: Teacher
    progress: bool = True
    address: str | None = None  # Ray cluster to use (None: RAY_ADDRESS, else a local one)
    resumed: bool = False  # continuing an interrupted run: drivers pick up their state from the store
    rows: dict[str, ResultRow] = field(default_factory=dict)  # spec_hash → result row, as recorded (Recorder)
    summary: dict[str, Any] = field(default_factory=dict)  # counts the driver reports (evaluations, cache_hits)

    @property
    def builder(self) -> Builder | None:
        """What the workers build this run's candidates with: its method's registry entry's (None: surgery)."""
        return get_method(self.config.method).worker_builder()

    def write_results(self) -> pa.Table:
        """(Re)write the run's results.parquet from every row so far: the one writer of that file (the
        recorder calls it as rows arrive, the job once the driver is done); returns the ranked table."""
        return write_results(self.store, self.run_id, self.rows.values())


@dataclass
class RunResult:
    """What `run` returns: where the run lives and its ranked results."""

    run_id: str
    store_uri: str
    status: str
    teacher_hash: str
    teacher_accuracy: float
    table: pa.Table
    summary: dict[str, Any]
    metric: str | None = None  # the task's metric the accuracy columns hold; None: top-1 accuracy


def new_run_id() -> str:
    """UTC start time to the millisecond plus 6 random hex digits: sorts by start, unique across machines."""
    now = datetime.now(timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(config: JobConfig, store: ArtifactStore | str | None = None, endpoint: str | None = None,
        progress: bool = True, address: str | None = None) -> RunResult:
    """Run one search job; every artifact goes to `store` (default: the config's `store`).

    `address` is the Ray cluster the workers run on (default: RAY_ADDRESS, else a local Ray).
    """
    check_device(config.device)
    check_ray_address(address)
    check_resources(config.resources, address)  # before anything is recorded: a run no node can serve is not one
    if not isinstance(store, ArtifactStore):
        store = open_store(store or config.store, endpoint=endpoint, options=StoreOptions.from_env())
    run_id = new_run_id()
    record: dict[str, Any] = {"run_id": run_id, "method": config.method, "status": "running", "started_at": _now(),
                              "code_version": code_version(), "store": store.uri}
    stopping.clear()  # a signal a previous job in this process had no chance to act on is not this one's
    stop_on_sigterm(deferred=True)  # config and record are written whole: a signal is acted on once they are
    store.put_bytes(layout.run_config(run_id), config_to_yaml(config).encode(), write_once=True)
    return _execute(config, store, run_id, record, progress, address, resumed=False)


def resume(store: ArtifactStore | str, run_id: str, endpoint: str | None = None, progress: bool = True,
           address: str | None = None) -> RunResult:
    """Continue an interrupted run from what the store holds: its config, its evaluations, driver state."""
    stopping.clear()
    if not isinstance(store, ArtifactStore):
        store = open_store(store, endpoint=endpoint, create=False, options=StoreOptions.from_env())
    if not layout.run_exists(store, run_id):
        raise KeyNotFoundError(f"run '{run_id}' does not exist in {store.uri}")
    upload_kept(store)
    key = layout.run_record(run_id)  # none if the run stopped between its config and its record
    record = store.get_mapping(key) if store.exists(key) else {"run_id": run_id}
    if record.get("status") == "finished":
        raise SearchsvcError(f"run '{run_id}' already finished; nothing to resume")
    config = parse_config(stored_config(store, run_id)[1], source=store.uri_for(layout.run_config(run_id)))
    check_device(config.device)
    check_ray_address(address)
    check_resources(config.resources, address)
    record.update(status="running", resumed_at=_now(), resumes=record.get("resumes", 0) + 1,
                  code_version=code_version())
    return _execute(config, store, run_id, record, progress, address, resumed=True)


def upload_kept(store: ArtifactStore) -> None:
    """Store what a run kept on local disk while the store was unreachable: candidates (files, then their
    manifest), then the run rows that point to them."""
    candidates = spool.upload(store, layout.CANDIDATES)
    for prefix in sorted({key.rsplit("/", 1)[0] for key in candidates}):
        if not store.exists(layout.manifest(prefix)):
            store.write_manifest(prefix)
    spool.upload(store, layout.RUNS)


def _with_memory(config: JobConfig, splits: Splits, teacher: Teacher, device: Any, address: str | None) -> JobConfig:
    """The config with `resources.memory_per_eval` filled in (estimated where null): each evaluation worker asks
    Ray for the host memory it holds, so the scheduler never oversubscribes a node (docs/clusters.md#memory)."""
    on_gpu = workers_on_gpu(config.resources, config.device, device, address)
    resources = with_memory(config.resources, teacher.model, splits, config.train.batch_size, on_gpu)
    return replace(config, resources=resources)


def _read_data(config: JobConfig, store: ArtifactStore) -> tuple[JobConfig, Splits]:
    """The run's data (on S3: through the store's endpoint), and the config with its fingerprint where the data
    has one (what the files are: in every identity; each worker checks the files it reads against it)."""
    splits = load_dataset(config.dataset, getattr(store, "endpoint", None))
    if splits.fingerprint is not None:
        config = replace(config, dataset=replace(config.dataset, fingerprint=splits.fingerprint))
    log.info("dataset %s: %s, %d classes, inputs %s", config.dataset.name, splits.sizes(), splits.num_classes,
             splits.inputs)
    return config, splits


def scored_by(config: JobConfig) -> dict[str, str]:
    """run.json's `metric` with a task (issue 37): what the accuracy columns hold; nothing for top-1 accuracy."""
    return {"metric": config.task.metric_name} if config.task is not None and not config.task.default else {}


def _execute(config: JobConfig, store: ArtifactStore, run_id: str, record: dict[str, Any], progress: bool,
             address: str | None, resumed: bool) -> RunResult:
    stop_on_sigterm(deferred=True)
    record_key = layout.run_record(run_id)
    record = sealed(record)  # run.json carries the checksum of its content: every write below re-seals it
    store.put_json(record_key, record)
    log.info("run %s (%s) %s %s", run_id, config.method, "resumed in" if resumed else "recording to",
             store.uri_for(layout.run(run_id)))
    started = time.perf_counter()

    def stopped_while_ray_starts(signum: int) -> None:
        store.put_json(record_key, {**record, "status": "stopped", "finished_at": _now(),
                                              "error": f"Stopped: stopped by signal {signum} while Ray started"})

    try:
        stop_on_sigterm()  # until Ray starts (ensure_ray), a signal stops the run at once ...
        stopping.check()  # ... as does one that came while the run was being recorded
        driver = get_method(config.method).load_driver()  # imports Ray and Tune: seconds a signal may land in
        config, splits = _read_data(config, store)
        record.update(data=splits.provenance())  # where each split came from, and its size
        device = resolve_device(config.device)
        teacher = load_or_train_teacher(store, config.teacher, config.dataset, splits, device, progress=progress,
                                        extra_meta={"code_version": code_version()})
        record.update(teacher_hash=teacher.teacher_hash, teacher_accuracy=teacher.test_accuracy,
                      teacher_val_accuracy=teacher.val_accuracy, teacher_cached=teacher.cached,
                      **scored_by(config))
        store.put_json(record_key, record)
        config = _with_memory(config, splits, teacher, device, address)
        context = RunContext(config, store, run_id, splits, teacher, progress, address, resumed=resumed)
        with stopping.last_words(stopped_while_ray_starts):
            driver(context)
        status = "finished"
        table = context.write_results()
    except BaseException as err:
        # By the user (resume continues it) — and so is whatever failed after a SIGTERM: a signal sent to the
        # process group also ends Ray's own daemons, and Ray then fails in its own ways.
        stopped = isinstance(err, (Stopped, KeyboardInterrupt)) or stopping.requested()
        # Ray lost a worker or a node and the retries ran out: one line naming the cause and how to resume.
        failure = None if stopped or not isinstance(err, Exception) else run_failed(err, store.uri, run_id)
        record.update(status="stopped" if stopped else "failed", error=f"{type(err).__name__}: {err}"
                      if failure is None else f"{type(failure).__name__}: {failure}",
                      finished_at=_now(), wall_s=time.perf_counter() - started)
        if not isinstance(err, StoreUnreachableError):  # else the record stays "running": resume continues it
            try:
                store.put_json(record_key, record)
            except StoreUnreachableError as down:  # the failure itself may come from the store going down
                raise StoreUnreachableError(
                    f"{type(err).__name__}: {first_line(err)}; then {down}. Once the store is back, `searchsvc "
                    f"resume --store {store.uri} --run {run_id}` continues the run") from None
        if stopped and not isinstance(err, (Stopped, KeyboardInterrupt)):
            stopping.check()  # the stop, not what it broke, is what the user sees
        stopping.clear()  # acted on
        if failure is not None:
            raise failure from err  # its traceback with --debug
        raise
    summary = {"evaluations": len(context.rows), "cache_hits": 0, **context.summary}
    record.update(status=status, finished_at=_now(), wall_s=time.perf_counter() - started, **summary)
    store.put_json(record_key, record)
    return RunResult(run_id, store.uri, status, teacher.teacher_hash, teacher.test_accuracy, table, summary,
                     record.get("metric"))
