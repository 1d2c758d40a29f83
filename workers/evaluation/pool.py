"""The actor pool: Ray actors with fractional GPUs evaluate candidates as they stream in.

Each actor loads the data and the teacher once onto the device Ray gave it (`gpus_per_eval: 0.25`
puts four actors on one GPU; without a GPU they run on CPU cores). Candidates go to whichever actor
is ready and free; results come back as each finishes, with no barrier. A stored evaluation is
returned from the store without training. An actor takes its next candidate as soon as the device is
done with the last one: the last one's store write (serialise, hash, fsync) runs beside the next one's
training, and its result comes back once it is stored.

On a cluster the actors are placed by resources alone (SPREAD over the nodes that have them, never
by host name), each asking for the host memory it holds (`memory_per_eval`). The pool follows the cluster:
an actor that died (its node lost, SIGKILL, Ray's memory monitor) is dropped and its candidate retried on
another (bounded: then the candidate is invalid, or after out-of-memory kills the run stops, resumable); a
replacement starts when the cluster has room, and a node that joins mid-run gets new actors within
GROW_EVERY_S. An actor takes work only once it is ready, so a replacement waiting for a node never holds a
candidate.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import ray
import torch
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from core.errors import SearchsvcError
from storage import ArtifactStore, CorruptArtifactError, StoreAccessError, StoreUnreachableError, StoreWriteError
from workers.data.datasets import DatasetConfig
from workers.evaluation.evaluate import (
    EvalContext,
    UnsavedResult,
    complete,
    compute_candidate,
    find_stored,
    local_context,
    save_and_complete,
)
from workers.evaluation.resources import MIB, Resources
from workers.evaluation.spec import Builder, CandidateSpec
from workers.measurement.metrics import CandidateMetrics
from workers.measurement.run_measures import Measures

log = logging.getLogger(__name__)
GROW_EVERY_S = 5.0  # seconds between looks at the cluster's size while candidates wait
WAKE_EVERY_S = 0.5  # seconds the driver waits on Ray at most before checking signals
# What a worker raises that is the store's fault, not the candidate's: the run stops on it in one line naming the
# key, never an invalid row (a corrupt teacher logits file would otherwise make every candidate invalid).
STORE_FAULTS = (StoreUnreachableError, StoreAccessError, StoreWriteError, CorruptArtifactError)
# What ray.get raises when an actor's process is gone: SIGKILL, a crash, its node lost (RayActorError), or Ray's memory
# monitor killed it (OutOfMemoryError, which is no RayActorError): the actor is replaced and its candidate retried.
WORKER_LOST = (RayActorError, OutOfMemoryError, WorkerCrashedError)


@dataclass
class EvalOutcome:
    """One candidate's metrics, and how they were obtained."""

    spec: CandidateSpec
    metrics: CandidateMetrics
    cached: bool  # from the store, no training
    attempts: int  # 1 unless an actor died under it
    unsaved: UnsavedResult | None = None  # the store was unreachable: the candidate's files travel here


def worker_context(store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                   resources: Resources, measures: Measures = Measures(),
                   builder: Builder | None = None) -> EvalContext:
    """Inside a Ray actor or Tune trial: data and teacher loaded onto the device Ray assigned; `measures`,
    what the run measures beyond the standard metrics (workers.measurement.run_measures); `builder`, the run's
    method's own candidate builder."""
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned: "cuda" is that GPU, never a fixed index.
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    where = f"{socket.gethostname()}:{os.getpid()}@{ray.get_runtime_context().get_node_id()[:8]}"  # host:pid@node
    return local_context(store, teacher_hash, dataset, resources, device, where, measures, builder)


def ray_resources(resources: Resources) -> dict[str, float]:
    """Ray's resource request for one evaluation: GPU share only where the cluster has GPUs; host memory in bytes
    (`memory_per_eval` MiB) where set, at most what the largest node offers (an estimate never makes an evaluation
    unschedulable)."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and resources.gpus_per_eval > 0
    request = {"CPU": resources.cpus_per_eval, "GPU": resources.gpus_per_eval if use_gpu else 0}
    if resources.memory_per_eval is not None:
        memory = resources.memory_per_eval * MIB
        largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if 0 < largest < memory:
            log.warning("resources.memory_per_eval: %d MiB is more than any node offers; asking for %d MiB",
                        resources.memory_per_eval, largest // MIB)
            memory = largest
        request["memory"] = memory
    return request


class EvalWorker:
    """One Ray actor: data and teacher resident on its device, one candidate at a time on the device while
    the previous one is stored (two threads: `evaluate`, then `saved` for the same candidate)."""

    def __init__(self, store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                 resources: Resources, measures: Measures = Measures(), builder: Builder | None = None) -> None:
        self.ctx = worker_context(store, teacher_hash, dataset, resources, measures, builder)
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._saving: dict[str, Future] = {}

    def evaluate(self, spec: CandidateSpec, takeover: bool = False) -> tuple[CandidateMetrics, bool]:
        """Build, train and measure `spec`, then start its store write; return (metrics, saving). While
        `saving`, `saved(spec_hash)` gives the stored metrics (maybe another writer's) once written.
        `takeover`: a retry after the actor evaluating `spec` died, maybe mid-save (its files are replaced)."""
        done = compute_candidate(spec, self.ctx)
        if not done.stored:
            return done.metrics, False
        self._saving[spec.spec_hash] = self._saver.submit(save_and_complete, self.ctx, done, takeover)
        return done.metrics, True

    def complete(self, stored: CandidateMetrics) -> CandidateMetrics:
        """A stored candidate's metrics with the run's own measurements it lacks (workers.measurement.run_measures)."""
        return complete(stored, self.ctx)

    def saved(self, spec_hash: str) -> CandidateMetrics:
        """Wait for the store write `evaluate` started; raises what it raised (UnsavedResult, store errors)."""
        return self._saving.pop(spec_hash).result()

    def name(self) -> str:
        return f"{self.ctx.worker} on {self.ctx.device}"

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def default_pool_size(resources: Resources) -> int:
    """Actors that fit the cluster now: by GPU share when there are GPUs, else by CPU cores."""
    total = ray.cluster_resources()
    if total.get("GPU", 0) > 0 and resources.gpus_per_eval > 0:
        size = math.floor(total["GPU"] / resources.gpus_per_eval + 1e-9)
    else:
        size = math.floor(total.get("CPU", 1) / resources.cpus_per_eval + 1e-9)
    memory = ray_resources(resources).get("memory", 0)
    if memory:  # no more actors than the cluster's memory holds: the rest would wait for room forever
        size = min(size, math.floor(total.get("memory", 0) / memory + 1e-9))
    if resources.max_concurrent is not None:
        size = min(size, resources.max_concurrent)
    return max(1, size)


class EvalPool:
    """Evaluate candidates on Ray actors; see the module docstring."""

    def __init__(self, store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                 resources: Resources = Resources(), size: int | None = None, max_retries: int = 2,
                 worker_class: type[EvalWorker] = EvalWorker, on_wait: Callable[[], None] | None = None,
                 measures: Measures = Measures(), builder: Builder | None = None) -> None:
        """`measures`: what each kept candidate is measured for beyond the standard metrics
        (workers.measurement.run_measures); `builder`: the run's method's own candidate builder (None: surgery)."""
        self.store = store
        self.measures = measures
        self.on_wait = on_wait  # called after every wait on Ray (at least twice a second)
        self.resources = resources
        self.max_retries = max_retries  # extra attempts after an actor died under a candidate
        request = ray_resources(resources)
        # Two threads per actor: one candidate on the device, one `saved` waiting for the last one's write.
        self._actor_class = ray.remote(num_cpus=request["CPU"], num_gpus=request["GPU"], memory=request.get("memory"),
                                       max_concurrency=2, scheduling_strategy="SPREAD")(worker_class)
        self._args = (store, teacher_hash, dataset, resources, measures, builder)
        self.fixed_size = size  # None: as many actors as the cluster holds, growing when nodes join
        self.actors: list[Any] = []
        self._starting: dict[Any, Any] = {}  # readiness ref → actor still loading data and teacher
        self.grow_every_s = GROW_EVERY_S
        self.lost = 0  # actors that died (their node went away, or a candidate killed them)
        self.replaced = 0  # of those, replaced at once (the cluster still had room)
        self.cache_hits = 0
        self._died_starting = 0  # actors in a row that died before they were ready
        for _ in range(self.target_size()):
            self._start_actor()
        self._looked = time.monotonic()

    @property
    def size(self) -> int:
        return len(self.actors)

    def target_size(self) -> int:
        """Actors wanted now: the fixed size, else what the cluster's resources hold."""
        return self.fixed_size or default_pool_size(self.resources)

    def _start_actor(self) -> None:
        actor = self._actor_class.remote(*self._args)
        self.actors.append(actor)
        self._starting[actor.name.remote()] = actor

    def _grow(self) -> None:
        """Start actors for resources that appeared (a node joined), at most every `grow_every_s`."""
        if self.fixed_size is not None or time.monotonic() - self._looked < self.grow_every_s:
            return
        self._looked = time.monotonic()
        for _ in range(self.target_size() - len(self.actors)):
            log.info("the cluster has room for another evaluation worker: starting one")
            self._start_actor()

    def map_unordered(self, specs: Iterable[CandidateSpec]) -> Iterator[EvalOutcome]:
        """Yield an outcome per spec as soon as it is ready; stored evaluations come first, untrained (one that
        lacks a measurement of the run's is completed by a worker first, from its stored model)."""
        pending: deque[tuple[CandidateSpec, int, CandidateMetrics | None]] = deque()  # (spec, attempt, stored)
        yield from self._stored(specs, pending)
        starting = {id(a) for a in self._starting.values()}
        idle = [a for a in self.actors if id(a) not in starting]
        in_flight: dict[Any, tuple[Any, CandidateSpec, int, str]] = {}  # ref → (actor, spec, attempt, phase)
        completing: dict[Any, CandidateMetrics] = {}  # ref → stored metrics being completed
        while pending or in_flight:
            self._dispatch(pending, idle, in_flight, completing)
            if pending:
                self._grow()
            # A bounded wait: the driver looks at stop requests (SIGTERM) and the cluster's size twice a second.
            ready, _ = ray.wait([*in_flight, *self._starting], num_returns=1, timeout=WAKE_EVERY_S)
            if self.on_wait is not None:
                self.on_wait()  # the driver's stop check (SIGTERM): may raise
            if not ready:
                continue
            if ready[0] in self._starting:
                idle.extend(self._started(ready[0]))
                continue
            actor, spec, attempt, phase = in_flight.pop(ready[0])
            if phase == "complete":
                outcome = self._completed(ready[0], actor, completing.pop(ready[0]), attempt, pending, idle, spec)
                if outcome is not None:
                    yield outcome
                continue
            try:
                result = ray.get(ready[0])
            except WORKER_LOST as err:
                self._lost(actor)
                idle = [a for a in idle if a is not actor]
                if attempt <= self.max_retries:
                    log.warning("worker died evaluating %s (attempt %d, %s); retrying on a fresh worker",
                                spec.spec_hash, attempt, type(err).__name__)
                    pending.appendleft((spec, attempt + 1, None))
                    continue
                if isinstance(err, OutOfMemoryError):  # the node's memory ran out, maybe to another process: no
                    raise  # verdict on this candidate; the run stops, and `searchsvc resume` tries it again
                metrics = CandidateMetrics.invalid(spec.spec_hash, f"worker died {attempt} times: {type(err).__name__}")
            except RayTaskError as err:  # an unexpected error inside evaluate: this candidate only
                if isinstance(err.cause, UnsavedResult):  # trained, but the store is gone: the driver keeps it
                    yield EvalOutcome(spec, err.cause.metrics, False, attempt, unsaved=err.cause)
                if isinstance(err.cause, STORE_FAULTS):
                    raise err.cause from None  # the store, not the candidate: the run stops (and can resume)
                if phase == "device":
                    idle.append(actor)
                metrics = CandidateMetrics.invalid(spec.spec_hash, f"evaluation raised {err.cause!r}"[:500])
            else:
                if phase == "device":
                    idle.append(actor)  # free for the next candidate while this one is stored
                    metrics, saving = result
                    if saving:
                        in_flight[actor.saved.remote(spec.spec_hash)] = (actor, spec, attempt, "store")
                        continue
                else:
                    metrics = result
            yield EvalOutcome(spec, metrics, cached=False, attempts=attempt)

    def _stored(self, specs: Iterable[CandidateSpec],
                pending: deque[tuple[CandidateSpec, int, CandidateMetrics | None]]) -> Iterator[EvalOutcome]:
        """Step one, on the driver (`find_stored`): the outcomes of stored candidates that are complete; the
        rest join `pending` (a stored one with its metrics, for an actor to complete)."""
        for spec in specs:
            found = find_stored(self.store, spec, self.measures)
            self.cache_hits += found is not None
            if found is not None and not found.incomplete:
                yield EvalOutcome(spec, found.metrics, cached=True, attempts=0)
            else:
                pending.append((spec, 1, found.metrics if found is not None else None))

    @staticmethod
    def _dispatch(pending: deque[tuple[CandidateSpec, int, CandidateMetrics | None]], idle: list[Any],
                  in_flight: dict[Any, tuple[Any, CandidateSpec, int, str]], completing: dict[Any, CandidateMetrics]
                  ) -> None:
        """Steps two and three on idle actors: complete a stored candidate, else evaluate (build, train, measure)."""
        while pending and idle:
            spec, attempt, stored = pending.popleft()
            actor = idle.pop()
            if stored is not None:
                ref = actor.complete.remote(stored)
                in_flight[ref], completing[ref] = (actor, spec, attempt, "complete"), stored
            else:
                in_flight[actor.evaluate.remote(spec, attempt > 1)] = (actor, spec, attempt, "device")

    def _completed(self, ref: Any, actor: Any, stored: CandidateMetrics, attempt: int,
                    pending: deque[tuple[CandidateSpec, int, CandidateMetrics | None]], idle: list[Any],
                    spec: CandidateSpec) -> EvalOutcome | None:
        """The outcome of a stored candidate completed: its metrics as stored if that failed (its budget then
        counts it as not measured); None when its actor died and it waits for another."""
        metrics = stored
        try:
            metrics = ray.get(ref)
        except WORKER_LOST:
            self._lost(actor)
            idle[:] = [a for a in idle if a is not actor]
            if attempt <= self.max_retries:
                pending.appendleft((spec, attempt + 1, stored))
                return None
            log.warning("candidate %s: its worker died completing it %d times; kept as stored", spec.spec_hash, attempt)
        except RayTaskError as err:
            if isinstance(err.cause, STORE_FAULTS):
                raise err.cause from None
            idle.append(actor)
            log.warning("candidate %s: completing it raised %r; kept as stored", spec.spec_hash, err.cause)
        else:
            idle.append(actor)
        return EvalOutcome(spec, metrics, cached=True, attempts=0)

    def _started(self, ref: Any) -> list[Any]:
        """The actor behind a readiness ref: [actor] once it loaded its data, [] if it died starting."""
        actor = self._starting.pop(ref)
        try:
            ray.get(ref)
        except WORKER_LOST as err:
            # The worker cannot start (data, teacher, store): not a candidate's fault, nor the infrastructure's.
            if isinstance(err, RayActorError) and err.actor_init_failed:
                raise SearchsvcError(f"an evaluation worker failed to start: {_cause_line(err)}") from None
            self._lost(actor)  # its node went away, or Ray's memory monitor killed it, before it was ready
            self._died_starting += 1
            if self._died_starting > (self.max_retries + 1) * self.target_size():  # its replacements die too
                raise
            return []
        self._died_starting = 0
        return [actor]

    def _lost(self, dead: Any) -> None:
        """Drop a dead actor; start a replacement when the cluster (or the fixed size) has room for it."""
        if all(a is not dead for a in self.actors):
            return  # already dropped: its other call in flight failed first
        self.actors = [a for a in self.actors if a is not dead]
        self.lost += 1
        if len(self.actors) < self.target_size():
            self.replaced += 1
            self._start_actor()

    def evaluate(self, specs: list[CandidateSpec]) -> list[EvalOutcome]:
        """All outcomes in the order of `specs` (they still run concurrently)."""
        by_hash = {o.spec.spec_hash: o for o in self.map_unordered(dict.fromkeys(specs))}
        return [by_hash[s.spec_hash] for s in specs]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self._starting = [], {}


def _cause_line(err: Exception) -> str:
    """The last line of a Ray error that names the cause ("SearchsvcError: dataset.root: ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line and not line.startswith("ray.")]
    return (causes or lines or [type(err).__name__])[-1][:500]

