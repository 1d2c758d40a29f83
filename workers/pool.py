"""The actor pool: Ray actors with fractional GPUs evaluate candidates as they stream in.

Each actor loads the data and the teacher once onto the device Ray gave it (`gpus_per_eval: 0.25`
puts four actors on one GPU; without a GPU they run on CPU cores). Candidates go to whichever actor
is free; results come back as each finishes, with no barrier. A dead actor is replaced and its
candidate retried (bounded); a stored evaluation is returned from the store without training.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from storage import ArtifactStore, SearchsvcError, StoreAccessError, StoreUnreachableError, UnsavedResult
from workers.data import DatasetConfig, load_dataset
from workers.evaluate import EvalContext, evaluate_candidate, invalid_metrics, stored_metrics
from workers.resources import Resources
from workers.spec import CandidateSpec
from workers.teacher import load_teacher

log = logging.getLogger(__name__)


@dataclass
class EvalOutcome:
    """One candidate's metrics, and how they were obtained."""

    spec: CandidateSpec
    metrics: dict[str, Any]
    cached: bool  # from the store, no training
    attempts: int  # 1 unless an actor died under it
    unsaved: dict[str, bytes] | None = None  # the candidate's files when the store was unreachable


def worker_context(store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                   resources: Resources) -> EvalContext:
    """Inside a Ray actor or Tune trial: data and teacher loaded onto the device Ray assigned."""
    torch.set_num_threads(max(1, int(resources.cpus_per_eval)))
    # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned: "cuda" is that GPU, never a fixed index.
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    teacher = load_teacher(store, teacher_hash, device)
    return EvalContext(store, teacher, load_dataset(dataset).to(device), device, compile_model=resources.compile)


def ray_resources(resources: Resources) -> dict[str, float]:
    """Ray's resource request for one evaluation: GPU share only where the cluster has GPUs."""
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and resources.gpus_per_eval > 0
    return {"CPU": resources.cpus_per_eval, "GPU": resources.gpus_per_eval if use_gpu else 0}


class EvalWorker:
    """One Ray actor: data and teacher resident on its device, evaluating one candidate at a time."""

    def __init__(self, store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                 resources: Resources) -> None:
        self.ctx = worker_context(store, teacher_hash, dataset, resources)

    def evaluate(self, spec: CandidateSpec) -> dict[str, Any]:
        return evaluate_candidate(spec, self.ctx)

    def name(self) -> str:
        return f"{self.ctx.worker} on {self.ctx.device}"


def default_pool_size(resources: Resources) -> int:
    """Actors that fit the cluster now: by GPU share when there are GPUs, else by CPU cores."""
    total = ray.cluster_resources()
    if total.get("GPU", 0) > 0 and resources.gpus_per_eval > 0:
        size = math.floor(total["GPU"] / resources.gpus_per_eval + 1e-9)
    else:
        size = math.floor(total.get("CPU", 1) / resources.cpus_per_eval + 1e-9)
    if resources.max_concurrent is not None:
        size = min(size, resources.max_concurrent)
    return max(1, size)


class EvalPool:
    """Evaluate candidates on Ray actors; see the module docstring."""

    def __init__(self, store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig,
                 resources: Resources = Resources(), size: int | None = None, max_retries: int = 2) -> None:
        self.store = store
        self.max_retries = max_retries  # extra attempts after an actor died under a candidate
        request = ray_resources(resources)
        self._actor_class = ray.remote(num_cpus=request["CPU"], num_gpus=request["GPU"])(EvalWorker)
        self._args = (store, teacher_hash, dataset, resources)
        self.size = size or default_pool_size(resources)
        self.actors = [self._new_actor() for _ in range(self.size)]
        self.replaced = 0  # actors that died and were replaced
        self.cache_hits = 0

    def _new_actor(self) -> Any:
        return self._actor_class.remote(*self._args)

    def map_unordered(self, specs: Iterable[CandidateSpec]) -> Iterator[EvalOutcome]:
        """Yield an outcome per spec as soon as it is ready; stored evaluations come first, untrained."""
        pending: deque[tuple[CandidateSpec, int]] = deque()
        for spec in specs:
            stored = stored_metrics(self.store, spec.spec_hash)
            if stored is not None:
                self.cache_hits += 1
                yield EvalOutcome(spec, stored, cached=True, attempts=0)
            else:
                pending.append((spec, 1))
        idle = list(self.actors)
        in_flight: dict[Any, tuple[Any, CandidateSpec, int]] = {}
        while pending or in_flight:
            while pending and idle:
                spec, attempt = pending.popleft()
                actor = idle.pop()
                in_flight[actor.evaluate.remote(spec)] = (actor, spec, attempt)
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor, spec, attempt = in_flight.pop(ready[0])
            try:
                metrics = ray.get(ready[0])
            except RayActorError as err:
                if err.actor_init_failed:  # the worker cannot start (data, teacher, store): not this candidate
                    raise SearchsvcError(f"an evaluation worker failed to start: {_first_line(err)}") from None
                idle.append(self._replace(actor))
                if attempt <= self.max_retries:
                    log.warning("worker died evaluating %s (attempt %d); retrying", spec.spec_hash, attempt)
                    pending.appendleft((spec, attempt + 1))
                    continue
                metrics = invalid_metrics(spec.spec_hash, f"worker died {attempt} times: {type(err).__name__}")
            except RayTaskError as err:  # an unexpected error inside evaluate: this candidate only
                if isinstance(err.cause, UnsavedResult):  # trained, but the store is gone: the driver keeps it
                    yield EvalOutcome(spec, err.cause.metrics, False, attempt, unsaved=err.cause.files)
                if isinstance(err.cause, (StoreUnreachableError, StoreAccessError)):
                    raise err.cause from None  # the store, not the candidate: the run stops (and can resume)
                idle.append(actor)
                metrics = invalid_metrics(spec.spec_hash, f"evaluation raised {err.cause!r}"[:500])
            else:
                idle.append(actor)
            yield EvalOutcome(spec, metrics, cached=False, attempts=attempt)

    def _replace(self, dead: Any) -> Any:
        self.replaced += 1
        fresh = self._new_actor()
        self.actors = [fresh if a is dead else a for a in self.actors]
        return fresh

    def evaluate(self, specs: list[CandidateSpec]) -> list[EvalOutcome]:
        """All outcomes in the order of `specs` (they still run concurrently)."""
        by_hash = {o.spec.spec_hash: o for o in self.map_unordered(dict.fromkeys(specs))}
        return [by_hash[s.spec_hash] for s in specs]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _first_line(err: Exception) -> str:
    """The last line of a Ray error that names the cause ("SearchsvcError: dataset.root: ...")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    causes = [line for line in lines if "Error:" in line and not line.startswith("ray.")]
    return (causes or lines or [type(err).__name__])[-1][:500]

