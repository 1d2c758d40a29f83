"""How a candidate becomes a measured model: surgery → distillation → measurement → the store.

    candidates/<spec_hash>/spec.json      the CandidateSpec (canonical JSON)
    candidates/<spec_hash>/model.pt       state_dict of the small model (weights_only=True loads it)
    candidates/<spec_hash>/metrics.json   accuracy, params, MACs, latency, bytes, wall time, history
    candidates/<spec_hash>/manifest.json  sha256 of each file; written last, so present = complete

A candidate that cannot be built, runs out of memory or diverges is a result with status `invalid`,
never a crash of the worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from core.names import load_object
from core.records import to_data
from storage import (
    ArtifactStore,
    CorruptArtifactError,
    KeyNotFoundError,
    StoreUnreachableError,
    WriteConflictError,
    layout,
)
from storage.base import json_bytes
from workers.compression.quantize import quantize_model, save_int8, stored_int8, unless_unquantizable
from workers.data.datasets import DatasetConfig, Splits, load_dataset
from workers.data.streaming import count
from workers.evaluation.resources import Resources
from workers.evaluation.spec import Builder, CandidateSpec
from workers.measurement.latency import measure_probes
from workers.measurement.measure import measure
from workers.measurement.metrics import CandidateMetrics, stored_metrics, verified_metrics
from workers.measurement.run_measures import Measures
from workers.models.cutting import shrink_graph
from workers.models.inputs import InputSpec
from workers.models.rebuild import rebuild, rebuild_mismatch
from workers.models.surgery import InvalidTransform, derive_arch, shrink
from workers.models.user_model import ModelSource, construct
from workers.models.zoo import (
    Model,
    PlainCNN,
    ResNet,
    arch_from_data,
    build_model,
    load_state_bytes,
    read_state_bytes,
    state_dict_bytes,
)
from workers.training.distill import cache_fits, distill_loss_fn, inference_copy, teacher_logits
from workers.training.task import Task
from workers.training.teacher import Teacher, checked_source, load_teacher, load_train_logits
from workers.training.train import LossFn, TrainCallback, augments, recalibrate_batchnorm, train_model

log = logging.getLogger(__name__)

# Seconds to wait for another writer's manifest: it is at most a few writes ahead, unless it died mid-save.
OTHER_WRITER_S = 30.0


class UnsavedResult(StoreUnreachableError):
    """A finished evaluation whose files could not be stored: they travel with the error (key → bytes)
    so the driver can keep them on local disk instead of losing them (`storage.spool`)."""

    def __init__(self, message: str, files: dict[str, bytes], metrics: CandidateMetrics) -> None:
        super().__init__(message)
        self.files, self.metrics = files, metrics

    def __reduce__(self):  # Ray pickles a worker's exception back to the driver: keep the payload
        return (type(self), (str(self), self.files, self.metrics))


@dataclass
class EvalContext:
    """What one worker holds for all its candidates: data and teacher on its device, cached logits."""

    store: ArtifactStore
    teacher: Teacher
    splits: Splits  # already on `device`
    device: torch.device
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    compile_model: bool = False  # torch.compile the training step
    cuda_graph: bool = True  # replay static training steps as one CUDA graph
    measures: Measures = field(default_factory=Measures)  # the run's own: a budget's latency probes, int8
    builder: Builder | None = None  # the run's method's own candidate builder (None: surgery on the teacher)
    # Held while a candidate uses the device: a second thread may store the previous one meanwhile.
    device_lock: threading.Lock = field(default_factory=threading.Lock)
    _logits: torch.Tensor | None = None
    _live: torch.nn.Module | None = None

    def live_teacher(self) -> torch.nn.Module:
        """The teacher run on every augmented batch, prepared once (on a GPU a bf16 copy: see `inference_copy`)."""
        if self._live is None:
            self._live = inference_copy(self.teacher.model, self.device)
        return self._live

    def train_logits(self) -> torch.Tensor:
        """The teacher's logits for the training split: from the store if cached there, else computed here."""
        if self._logits is None:
            self._logits = load_train_logits(self.store, self.teacher.teacher_hash, self.device)
        if self._logits is None or len(self._logits) != count(self.splits.train):
            self.teacher.model.to(self.device, memory_format=torch.channels_last)
            self._logits = teacher_logits(self.teacher.model, self.splits.train, self.splits.mean, self.splits.std,
                                          output=self.teacher.task.output)
        return self._logits


def local_context(store: ArtifactStore, teacher_hash: str, dataset: DatasetConfig, resources: Resources,
                  device: torch.device, where: str, measures: Measures = Measures(),
                  builder: Builder | None = None) -> EvalContext:
    """A worker's context on `device` (a Ray actor's, or a worker process's without Ray): threads, the GPU
    share as a memory cap, cuDNN autotuning, then data and teacher loaded onto the device. `measures`: what
    the run measures of each kept candidate beyond the standard metrics (workers.measurement.run_measures);
    `builder`: the run's method's own candidate builder."""
    torch.set_num_threads(max(1, int(resources.cpus_per_eval)))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes within a candidate: autotuning pays at once
        if 0 < resources.gpus_per_eval < 1:  # a share of the GPU is a share of its memory too
            torch.cuda.set_per_process_memory_fraction(resources.gpus_per_eval, torch.cuda.current_device())
    teacher = load_teacher(store, teacher_hash, device)
    return EvalContext(store, teacher, load_dataset(dataset, getattr(store, "endpoint", None)).to(device), device, worker=where,
                       compile_model=resources.compile, cuda_graph=resources.cuda_graph, measures=measures,
                       builder=builder)


def invalid(spec: CandidateSpec, reason: str, started: float, ctx: EvalContext) -> CandidateMetrics:
    """`CandidateMetrics.invalid` for a candidate this worker gave up on, timed from `started`."""
    return CandidateMetrics.invalid(spec.spec_hash, reason, time.perf_counter() - started, ctx.worker)


def evaluate_candidate(spec: CandidateSpec, ctx: EvalContext, progress: bool = False,
                       callbacks: Sequence[TrainCallback] = (), takeover: bool = False) -> CandidateMetrics:
    """Build, distill, measure and store one candidate; return its metrics (status ok or invalid).

    `callbacks` join the method's own in the training loop (a Tune trial reports epochs through one).
    `takeover`: an earlier writer of this candidate is known dead (see `save_candidate`).
    A worker that evaluates a stream of candidates calls the two halves itself, so that the store write
    of one overlaps the training of the next (`workers.evaluation.pool.EvalWorker`).
    """
    return save_and_complete(ctx, compute_candidate(spec, ctx, progress, callbacks), takeover)


@dataclass(frozen=True)
class Stored:
    """What the store holds of a candidate: its metrics, and whether they lack the run's own measurements."""

    metrics: CandidateMetrics
    incomplete: bool  # a budget's latency probe or int8 figures to add (workers.measurement.run_measures)


def find_stored(store: ArtifactStore, spec: CandidateSpec, measures: Measures) -> Stored | None:
    """Step one of every evaluation: a candidate already in the store is never trained again. A cache hit checks
    every file it reuses against the candidate's manifest (model.pt too, which its row points to): a mismatch is a
    CorruptArtifactError naming the file, and the run stops (write-once: a fresh evaluation could not replace it)."""
    metrics = stored_metrics(store, spec.spec_hash)
    if metrics is not None:
        store.verify(layout.candidate(spec.spec_hash))
    return None if metrics is None else Stored(metrics, measures.incomplete(metrics))


def stored_or_evaluated(spec: CandidateSpec, ctx: EvalContext,
                        callbacks: Sequence[TrainCallback] = ()) -> tuple[CandidateMetrics, bool]:
    """Stored, else evaluated, then completed, in this process (a Tune trial): (metrics, from the store). The
    actor pool takes the same three steps, the lookup on the driver and the other two on its actors."""
    found = find_stored(ctx.store, spec, ctx.measures)
    if found is None:
        return evaluate_candidate(spec, ctx, callbacks=callbacks), False
    return (complete(found.metrics, ctx) if found.incomplete else found.metrics), True


@dataclass
class Evaluated:
    """A candidate the device is done with: its metrics and the model to keep (on the CPU)."""

    spec: CandidateSpec
    metrics: CandidateMetrics
    model: torch.nn.Module | None = None
    stored: bool = True  # False: not written (out of memory: it may fit another time)


def save_evaluated(store: ArtifactStore, done: Evaluated, takeover: bool = False) -> CandidateMetrics:
    """The store half of `evaluate_candidate`: no device work, so it can run beside the next candidate."""
    if not done.stored:
        return done.metrics
    return save_candidate(store, done.spec, done.model, done.metrics, takeover)


def save_and_complete(ctx: EvalContext, done: Evaluated, takeover: bool = False) -> CandidateMetrics:
    """Store the candidate, then add the run's own measurements (int8) from the model in hand: CPU work,
    which a pool actor runs beside the next candidate's training."""
    metrics = save_evaluated(ctx.store, done, takeover)
    return complete(metrics, ctx, done.model, retime=False) if done.stored else metrics


def compute_candidate(spec: CandidateSpec, ctx: EvalContext, progress: bool = False,
                      callbacks: Sequence[TrainCallback] = ()) -> Evaluated:
    """The device half of `evaluate_candidate`: build, train, measure. Holds `ctx.device_lock`."""
    with ctx.device_lock:
        started, started_unix_s = time.perf_counter(), time.time()
        try:
            built = build_student(spec, ctx)
        except InvalidTransform as err:
            return Evaluated(spec, invalid(spec, f"invalid transform: {err}", started, ctx))
        history: list[dict[str, Any]] = []
        if built.train:
            trained = _train(spec, ctx, built, progress, callbacks)
            if trained is None:
                del built  # the student's tensors, before the cache is emptied
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                return Evaluated(spec, invalid(spec, "out of memory", started, ctx), stored=False)
            history = trained
        if not all(math.isfinite(epoch["loss"]) for epoch in history):
            return Evaluated(spec, invalid(spec, "training diverged (non-finite loss)", started, ctx))
        return _measured(spec, ctx, built, history, (started, started_unix_s))


def _train(spec: CandidateSpec, ctx: EvalContext, built: Built, progress: bool,
           callbacks: Sequence[TrainCallback]) -> list[dict[str, Any]] | None:
    """`train_model` on the built student; None when the device ran out of memory. Returning (rather than
    handling the error in the caller's except block) drops the traceback that holds the step's tensors."""
    try:
        return train_model(built.model, ctx.splits, spec.train, ctx.device, seed=spec.seed,
                           desc=f"candidate {spec.spec_hash}", progress=progress, loss_fn=_loss_fn(spec, ctx),
                           compile_model=ctx.compile_model, callbacks=(*built.callbacks, *callbacks),
                           cuda_graph=ctx.cuda_graph)
    except torch.OutOfMemoryError:
        return None


def _measured(spec: CandidateSpec, ctx: EvalContext, built: Built, history: list[dict[str, Any]],
              start: tuple[float, float]) -> Evaluated:
    """Finish (thin), recalibrate batch norm where training did not, measure; the kept model moves to the CPU.
    `start`: (perf_counter, unix time) when the candidate's evaluation began."""
    started, started_unix_s = start
    student, extra = built.model, dict(built.metrics)
    train_seconds = time.perf_counter() - started
    if built.finish is not None:
        student, finished = built.finish(student)
        extra.update(finished)
    student.to(ctx.device)
    # Training re-estimated the batch-norm statistics after its last epoch; a model changed since (thinned)
    # or never trained (sensitivity) gets them here, so every candidate is measured with fresh ones.
    unchanged = built.train and built.finish is None
    recalibrated = history[-1].get("bn_recalibration_batches", 0) if history else 0
    if not unchanged:
        recalibrated = recalibrate_batchnorm(student, ctx.splits, spec.train.bn_recalibration_batches,
                                             spec.train.batch_size, spec.seed)
    # The last epoch evaluated this very model on both splits: its figures are the candidate's.
    accuracies = ({"accuracy": history[-1]["test_accuracy"], "val_accuracy": history[-1]["val_accuracy"]}
                  if unchanged and history else None)
    measured = measure(student, ctx.splits, ctx.device, timed=built.keep_model, accuracies=accuracies,
                       task=Task(spec.train.task))
    if built.keep_model:
        extra.update(measure_probes(student, ctx.measures.probes, ctx.device, ctx.splits.inputs))
    # A zoo model records what was built; a user's network is rebuilt from its teacher's constructor and the
    # stored tensors' shapes (workers.models.rebuild): shown to work before the candidate counts as ok.
    arch = to_data(student.arch) if hasattr(student, "arch") else None
    if built.keep_model and arch is None and "source" in ctx.teacher.meta:
        student = student.cpu()  # where it is kept anyway; the rebuild is on the CPU
        fresh = construct(ModelSource.from_data(ctx.teacher.meta["source"]), ctx.splits.inputs)
        probe = ctx.splits.inputs.example(student)
        reason = rebuild_mismatch(student, fresh, spec.removed, probe)
        if reason is not None:
            return Evaluated(spec, invalid(spec, reason, started, ctx))
    metrics = CandidateMetrics(spec.spec_hash, "ok", **measured, train_seconds=train_seconds, history=tuple(history),
                               worker=ctx.worker, device=str(ctx.device), arch=arch,
                               started_unix_s=started_unix_s, bn_recalibration_batches=recalibrated, extra=extra,
                               wall_s=time.perf_counter() - started)  # build, train, measure: the store write is apart
    return Evaluated(spec, metrics, student.cpu() if built.keep_model else None)


def complete(metrics: CandidateMetrics, ctx: EvalContext, model: torch.nn.Module | None = None,
             retime: bool = True) -> CandidateMetrics:
    """A kept candidate's metrics with the run's own measurements it lacks (workers.measurement.run_measures): timed at the
    budget's latency probes, and its int8 figures, stored ones read back (checked) or quantized now and
    stored in its int8 folder. `model`: the candidate's model if in hand, else read from the store;
    `retime=False`: no probes (a fresh candidate was timed with them as it was measured: one that lacks a
    value could not be timed). Never retrains, and never rewrites the candidate's files (write-once): the
    run's row records what is added."""
    probes = ctx.measures.missing_probes(metrics) if retime else ()
    int8 = ctx.measures.needs_int8(metrics)
    if not probes and not int8:
        return metrics
    extra = dict(metrics.extra)
    if model is None:
        model = load_candidate_model(ctx.store, metrics.spec_hash)
    if probes:
        with ctx.device_lock:
            extra.update(measure_probes(model.to(ctx.device), probes, ctx.device, ctx.splits.inputs))
    if int8:
        config = ctx.measures.quantize
        figures = stored_int8(ctx.store, metrics.spec_hash, config) or unless_unquantizable(
            metrics.spec_hash, lambda: save_int8(ctx.store, metrics.spec_hash, config, quantize_model(
                model.cpu(), ctx.splits, config, eval_threads=torch.get_num_threads(), task=Task(ctx.teacher.task))))
        extra.update(asdict(figures) if figures is not None else {})
    return replace(metrics, extra=extra)


def _loss_fn(spec: CandidateSpec, ctx: EvalContext) -> LossFn | None:
    """The task's loss (None), or distillation from the teacher: live when augmenting or matching every output
    (`task.distill_on: outputs`), else cached logits (the teacher's prediction)."""
    distill, task = spec.train.distill, Task(spec.train.task)
    if distill.alpha == 0:
        return None
    # The teacher must see the same augmented batch; every output of it is not cached, nor outputs too large to.
    if augments(spec.train, ctx.splits.inputs) or task.config.distill_on == "outputs" or \
            not cache_fits(ctx.teacher.model, ctx.splits, task.config.output):
        return distill_loss_fn(distill, teacher=ctx.live_teacher(), task=task)
    return distill_loss_fn(distill, cached=ctx.train_logits(), task=task)


@dataclass
class Built:
    """What a builder hands to evaluation: the untrained student and how it is trained and kept."""

    model: Model
    metrics: dict[str, Any] = field(default_factory=dict)  # added to the candidate's metrics
    callbacks: tuple[TrainCallback, ...] = ()  # in the training loop (a compression schedule)
    train: bool = True  # False: measured as built (sensitivity analysis)
    keep_model: bool = True  # False: only metrics are stored, and latency is not measured
    finish: Callable[[Model], tuple[Model, dict[str, Any]]] | None = None  # after training: e.g. thinning


def build_student(spec: CandidateSpec, ctx: EvalContext) -> Built:
    """The untrained student: the method's own builder, else surgery on the teacher (or the `init` model as is)."""
    parent = load_candidate_model(ctx.store, spec.init) if spec.init is not None else ctx.teacher.model
    if ctx.builder is not None and spec.method == ctx.builder.method:
        return load_object(ctx.builder.function)(parent, spec, ctx)
    if spec.params or spec.schedule is not None:  # surgery would build another network under this spec's hash
        raise ValueError(f"candidate {spec.spec_hash} of method {spec.method} needs its method's builder; this "
                         f"worker has {ctx.builder}")
    if spec.init is not None:
        return Built(parent)
    if not isinstance(parent, ResNet):  # a user's network or a plain zoo net: cut through its dependency graph
        small = shrink_graph(parent, ctx.splits.inputs.example(parent), spec.removed, spec.widths,
                             kernels=spec.kernels)
        if isinstance(small, PlainCNN):  # the zoo's: what was built is recorded as an architecture
            small.arch = small.described()
        return Built(small)
    if spec.kernels:
        raise InvalidTransform("kernel sizes are cut in networks without skips and users' own, not the zoo's ResNets")
    return Built(shrink(parent, spec.removed, spec.widths))


def load_candidate_model(store: ArtifactStore, spec_hash: str) -> Model:
    """A stored candidate as its small nn.Module (eval mode, CPU), every file checked against the manifest."""
    prefix = layout.candidate(spec_hash)
    if not store.exists(layout.manifest(prefix)):
        raise KeyNotFoundError(f"candidate {spec_hash} is not in {store.uri} (or its evaluation is incomplete)")
    spec = CandidateSpec.from_json(store.get_verified(prefix, layout.SPEC).decode())
    if not store.exists(layout.candidate_model(spec_hash)):
        raise KeyNotFoundError(f"candidate {spec_hash} has no kept model (it was invalid)")
    metrics = verified_metrics(store, spec_hash)
    raw = store.get_verified(prefix, layout.MODEL)
    where = store.uri_for(layout.candidate_model(spec_hash))
    if metrics.arch is not None:  # what was built (a method's builder decides widths on the worker)
        arch = arch_from_data(metrics.arch, source=store.uri_for(layout.candidate_metrics(spec_hash)))
        return load_state_bytes(build_model(arch), raw, where).eval()
    meta = json.loads(store.get_verified(layout.teacher(spec.teacher), layout.META))
    if "source" in meta:  # a user's network: its constructor, its units removed, layers at the stored shapes
        model = construct(checked_source(store, spec.teacher, meta), InputSpec.from_meta(meta))
        try:
            return rebuild(model, spec.removed, read_state_bytes(raw, where))
        except (InvalidTransform, RuntimeError, AttributeError) as err:  # tensors that fit no such structure
            raise CorruptArtifactError(f"{where} does not fit {meta['source']['model']}: {err}") from None
    teacher_arch = arch_from_data(meta["arch"], source=store.uri_for(layout.teacher_meta(spec.teacher)))
    return load_state_bytes(build_model(derive_arch(teacher_arch, spec.removed, spec.widths)), raw, where).eval()


def save_candidate(store: ArtifactStore, spec: CandidateSpec, model: torch.nn.Module | None,
                   metrics: CandidateMetrics, takeover: bool = False) -> CandidateMetrics:
    """Write the candidate's files once. If another worker finished it first, return theirs (idempotent).

    Files without a manifest belong to a writer still at work, or to one that died mid-save (its node was
    removed). With `takeover` (the pool retries a candidate because its actor died) they are replaced at
    once; otherwise after `OTHER_WRITER_S` without the other writer's manifest.
    """
    prefix = layout.candidate(spec.spec_hash)
    files = {layout.candidate_spec(spec.spec_hash): spec.canonical_json().encode()}
    if model is not None:
        files[layout.candidate_model(spec.spec_hash)] = state_dict_bytes(model)
        metrics = replace(metrics, artifact=store.uri_for(layout.candidate_model(spec.spec_hash)))
    files[layout.candidate_metrics(spec.spec_hash)] = json_bytes(metrics.to_data())
    try:
        existing = stored_metrics(store, spec.spec_hash)
        if existing is not None:
            return existing
        try:
            _write_candidate(store, prefix, files, write_once=not takeover)
        except WriteConflictError:
            log.info("candidate %s is being stored by another worker; waiting for it", spec.spec_hash)
            stored = _wait_for_other_writer(store, spec.spec_hash)
            if stored is not None:
                return stored
            log.warning("candidate %s: the other writer left no manifest in %.0f s; replacing its files",
                        spec.spec_hash, OTHER_WRITER_S)
            _write_candidate(store, prefix, files, write_once=False)
    except WriteConflictError:  # the manifest: the other writer finished after all
        return stored_metrics(store, spec.spec_hash) or metrics
    except StoreUnreachableError as err:  # the driver keeps the files on local disk; resume stores them
        raise UnsavedResult(str(err), files, metrics) from None
    return metrics


def _write_candidate(store: ArtifactStore, prefix: str, files: dict[str, bytes], write_once: bool) -> None:
    for key, data in files.items():
        store.put_bytes(key, data, write_once=write_once)
    # last, and always write-once: its presence marks the folder complete
    store.write_manifest(prefix, {key[len(prefix) + 1 :]: data for key, data in files.items()})


def _wait_for_other_writer(store: ArtifactStore, spec_hash: str) -> CandidateMetrics | None:
    deadline = time.monotonic() + OTHER_WRITER_S
    while time.monotonic() < deadline:
        stored = stored_metrics(store, spec_hash)
        if stored is not None:
            return stored
        time.sleep(0.2)
    return None
