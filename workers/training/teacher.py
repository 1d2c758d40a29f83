"""Teachers are trained once per (architecture, data, recipe) and shared across runs via the store.

    teachers/<teacher_hash>/model.pt       state_dict (loads with weights_only=True)
    teachers/<teacher_hash>/meta.json      architecture, data identity, recipe, accuracy, history
    teachers/<teacher_hash>/manifest.json  sha256 of both, written last: present = complete
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from core.errors import SearchsvcError
from core.records import MAX_SEED, canonical_json, from_data, to_data
from storage import ArtifactStore, CorruptArtifactError, WriteConflictError, layout
from workers.data.datasets import DatasetConfig, Splits
from workers.evaluation.spec import short_hash
from workers.models.inputs import InputSpec
from workers.models.user_model import ModelSource, check_outputs, construct, load_weights, read_weights, weights_file
from workers.models.zoo import (
    Model,
    arch_from_data,
    build_model,
    list_models,
    load_state_bytes,
    model_arch,
    state_dict_bytes,
)
from workers.training.distill import teacher_logits
from workers.training.task import Task, TaskConfig, checked_metric
from workers.training.train import (
    DEFAULT_BN_RECALIBRATION_BATCHES,
    MAX_LR,
    Recipe,
    evaluate_split,
    recalibrate_batchnorm,
    slow_norms,
    train_model,
)

log = logging.getLogger(__name__)
TEACHER_FORMAT = 1  # bump when the saved layout or the training code changes what a teacher is


@dataclass(frozen=True)
class TeacherConfig(Recipe):
    """The teacher network and its training recipe: a zoo model (`arch`, trained here), or the user's own
    (`model` + `kwargs`, from `weights` as given, else trained here)."""

    arch: str | None = field(default=None, metadata={
        "choices": list_models, "help": "zoo model name (default resnet20); or give teacher.model"})
    epochs: int = field(default=15, metadata={"min": 1, "help": "passes over the training split"})
    lr: float = field(default=0.1, metadata={
        "gt": 0, "max": MAX_LR, "help": "peak learning rate of the one-cycle schedule"})
    seed: int = field(default=0, metadata={
        "min": 0, "max": MAX_SEED, "help": "seed of the initial weights and batch order"})
    model: str | None = field(default=None, metadata={
        "omit_default": True, "help": "your own network: torchvision:NAME, timm:NAME or package.module:factory"})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "omit_default": True, "help": "keyword arguments of teacher.model's constructor, e.g. {num_classes: 10}"})
    weights: str | None = field(default=None, metadata={
        "omit_default": True, "help": "teacher.model's state_dict (.pt/.pth/.safetensors; path relative to the "
                                      "config file, or s3://); given weights are evaluated, not trained"})
    finetune_epochs: int = field(default=0, metadata={
        "omit_default": True, "min": 0, "help": "given weights: epochs of fine-tuning on this data first (a new "
                                                 "teacher, stored apart); 0: used as given"})

    def __post_init__(self) -> None:
        if self.model is not None and self.arch is not None:
            raise ValueError("arch: give teacher.arch (a zoo model) or teacher.model (your own network), not both")
        for key in ("kwargs", "weights", "finetune_epochs"):
            if self.model is None and getattr(self, key):
                raise ValueError(f"{key}: only with teacher.model (your own network)")
        if self.finetune_epochs and self.weights is None:
            raise ValueError("finetune_epochs: fine-tunes given weights; without teacher.weights the model is "
                             "trained for teacher.epochs")
        if self.model is None and self.arch is None:
            object.__setattr__(self, "arch", "resnet20")  # the default zoo teacher

    @property
    def base(self) -> str:
        """What candidates are cut from: the zoo name, or the user's constructor."""
        return self.model or self.arch or ""

    @property
    def source(self) -> ModelSource | None:
        """The user's model as data (weights by hash once read), or None for a zoo teacher."""
        return None if self.model is None else ModelSource(self.model, self.kwargs)


@dataclass
class Teacher:
    """A trained teacher: the model (eval mode) plus what is known about it."""

    model: nn.Module  # a zoo `Model`, or the user's own network
    teacher_hash: str
    meta: dict[str, Any]
    cached: bool  # True when loaded from the store rather than trained now

    @property
    def test_accuracy(self) -> float:
        """Top-1 on the test split: reported, never used to choose."""
        return float(self.meta["test_accuracy"])

    @property
    def val_accuracy(self) -> float:
        """The task's metric (top-1 by default) on the validation split: what candidates' rewards and stop rules
        compare against."""
        return float(self.meta["val_accuracy"])

    @property
    def task(self) -> TaskConfig:
        """The task it was trained and judged on (its recipe's; classification for teachers stored before)."""
        raw = (self.meta.get("config") or {}).get("task")
        return from_data(TaskConfig, raw, source="the teacher's recorded task") if raw else TaskConfig()


def untrained_network(config: TeacherConfig) -> nn.Module:
    """The teacher's network with fresh weights, from its config alone: what a schedule's or a sensitivity
    analysis's weight names are checked against at validate."""
    return build_model(model_arch(config.arch)) if config.source is None else construct(config.source)


def data_identity(dataset: DatasetConfig) -> dict[str, Any]:
    """The parts of a dataset config that change the data (not where the files are, nor downloads)."""
    identity = to_data(dataset.identity())
    identity.pop("root"), identity.pop("download")
    if dataset.name != "synthetic":
        identity.pop("synthetic")
    if dataset.image_size is not None and dataset.name != "imagefolder":
        identity["resized"] = True  # image_size once applied to imagefolder alone: a resized dataset is new data
    return identity


def teacher_hash(config: TeacherConfig, dataset: DatasetConfig, weights_sha256: str | None = None) -> str:
    """Identity of a teacher, 16 hex digits: architecture, recipe, seed and data; for given weights, the
    constructor, its kwargs, the weights' sha256 and the data (plus the recipe when fine-tuned)."""
    return _identity_hash(to_data(config), data_identity(dataset), weights_sha256)


def _identity_hash(teacher: dict[str, Any], dataset: dict[str, Any], weights_sha256: str | None) -> str:
    """`teacher_hash` from plain data: the config's, or a stored meta.json's (checked on load)."""
    teacher = dict(teacher)
    if weights_sha256 is not None:
        if teacher.get("finetune_epochs"):  # the recipe makes it another teacher; where the file was does not
            teacher.pop("weights", None)
        else:
            teacher = {"model": teacher.get("model"), "kwargs": teacher.get("kwargs", {})}
        teacher["weights_sha256"] = weights_sha256
    return short_hash(canonical_json({"format": TEACHER_FORMAT, "teacher": teacher, "dataset": dataset}))


def load_or_train_teacher(store: ArtifactStore, config: TeacherConfig, dataset: DatasetConfig, splits: Splits,
                          device: torch.device, progress: bool = True,
                          extra_meta: dict[str, Any] | None = None) -> Teacher:
    """Load the teacher from `teachers/<hash>/` if a complete one is there; else build it (the zoo's `arch`,
    or the user's `model` with its given `weights`), train it unless its weights are given (or fine-tune
    them when asked), evaluate it and store it. Nothing is stored for a teacher that fails."""
    # s3:// weights are read through the store's own endpoint (--s3-endpoint), the one the user pointed us at
    raw, sha256 = weights_file(config.weights, getattr(store, "endpoint", None)) if config.weights is not None \
        else (b"", None)
    key = teacher_hash(config, dataset, sha256)
    prefix = layout.teacher(key)
    if store.exists(layout.manifest(prefix)):
        teacher = load_teacher(store, key)
        ensure_val_accuracy(store, teacher, splits, device)
        log.info("teacher %s (%s) loaded from %s: test accuracy %.4f", key, config.base, store.uri_for(prefix),
                 teacher.test_accuracy)
        return teacher
    model, identity = _untrained(config, splits, raw, sha256)
    epochs = 0 if sha256 is not None and not config.finetune_epochs else config.finetune_epochs or config.epochs
    history, seconds, recalibrated = [], 0.0, False
    if epochs:
        log.info("training teacher %s (%s, %d epochs) on %s", key, config.base, epochs, device)
        started = time.perf_counter()
        history = train_model(model, splits, replace(config, epochs=epochs), device, seed=config.seed,
                              desc=f"teacher {config.base}", progress=progress)
        seconds = time.perf_counter() - started
        if slow_norms(model):  # statistics that lag the trained weights: re-estimated before it is judged
            recalibrate_batchnorm(model, splits.to(device), DEFAULT_BN_RECALIBRATION_BATCHES, config.batch_size,
                                  config.seed)
            recalibrated = True  # the epochs' figures were taken with the lagging statistics: measured again below
    task = Task(config.task)
    data = splits.to(device)
    model.to(device)
    meta = {
        "teacher_hash": key, **identity, "config": to_data(config), "dataset": data_identity(dataset),
        "test_accuracy": history[-1]["test_accuracy"] if history and not recalibrated else
        evaluate_split(model, data.test, data.mean, data.std, task=task),
        "val_accuracy": evaluate_split(model, data.val, data.mean, data.std, task=task),
        "train_seconds": seconds, "device": str(device), "history": history, "mean": data.mean, "std": data.std,
        **data.inputs.meta(), "num_classes": data.num_classes,
        **(extra_meta or {}),
    }
    model.eval()
    if config.task is not None:  # a score that is NaN on the teacher cannot rank any candidate: refused, not stored
        checked_metric(meta["val_accuracy"], "on the teacher's validation split")
    _save(store, prefix, model, meta)
    log.info("teacher %s %s in %.0f s: test %s %.4f; stored at %s", key, "trained" if epochs else "evaluated as given",
             seconds, task.config.metric_name, meta["test_accuracy"], store.uri_for(prefix))
    return Teacher(model, key, meta, cached=False)


def _untrained(config: TeacherConfig, splits: Splits, raw: bytes, sha256: str | None) -> tuple[nn.Module, dict]:
    """The teacher before any training here, and how meta.json names what builds it (`arch` or `source`)."""
    torch.manual_seed(config.seed)  # the initial weights
    if config.source is None:
        if not splits.inputs.is_image:
            raise SearchsvcError(f"teacher.arch: the zoo's networks take images [C, H, W]; this data's inputs are "
                                 f"{splits.inputs} — bring your own network (teacher.model, docs/your-model.md)")
        arch = model_arch(config.arch, splits.inputs.channels, splits.num_classes)
        return build_model(arch), {"arch": to_data(arch)}
    source = replace(config.source, weights_sha256=sha256)
    model = construct(source, splits.inputs)
    if sha256 is not None:
        load_weights(model, read_weights(raw, config.weights), config.weights)
    check_outputs(model, splits.inputs, splits.num_classes, config.task)
    return model, {"source": source.to_data(), "weights": config.weights}


def _save(store: ArtifactStore, prefix: str, model: Model, meta: dict[str, Any]) -> None:
    try:
        store.put_bytes(layout.file_in(prefix, layout.MODEL), state_dict_bytes(model), write_once=True)
        store.put_json(layout.file_in(prefix, layout.META), meta, write_once=True)
    except WriteConflictError:
        # Another run trained the same teacher at the same time and stored first: use theirs.
        log.warning("teacher %s was stored by another run meanwhile; keeping the stored one", prefix)
        return
    store.write_manifest(prefix)


def load_teacher(store: ArtifactStore, key: str, device: torch.device | str = "cpu") -> Teacher:
    """Load a stored teacher, checking each file against the manifest (a corrupt file is an error)."""
    prefix = layout.teacher(key)
    meta = json.loads(store.get_verified(prefix, layout.META))
    if "source" in meta:  # the user's own network: its constructor, then the stored weights
        model = construct(checked_source(store, key, meta), InputSpec.from_meta(meta))
    else:
        model = build_model(arch_from_data(meta["arch"], source=store.uri_for(layout.teacher_meta(key))))
    raw = store.get_verified(prefix, layout.MODEL)
    model = load_state_bytes(model, raw, store.uri_for(layout.teacher_model(key)))
    model.to(device).eval()
    return Teacher(model, key, meta, cached=True)


def checked_source(store: ArtifactStore, key: str, meta: dict[str, Any]) -> ModelSource:
    """The constructor a stored teacher names, once its meta.json is shown to hash to the teacher's own key:
    an edited constructor or kwargs would import and call other code, so it is refused before anything runs."""
    source, config = ModelSource.from_data(meta["source"]), meta.get("config") or {}
    if (source.model, dict(source.kwargs)) != (config.get("model"), config.get("kwargs", {})) or \
            _identity_hash(config, meta.get("dataset") or {}, source.weights_sha256) != key:
        raise CorruptArtifactError(f"{store.uri_for(layout.teacher_meta(key))} is corrupt: its model "
                                   f"and recipe do not hash to the teacher {key}")
    return source


def ensure_val_accuracy(store: ArtifactStore, teacher: Teacher, splits: Splits, device: torch.device) -> float:
    """The teacher's validation accuracy. Teachers stored before it was part of meta.json get it computed
    once and recorded beside them (`validation/val.json`), since their own files are write-once."""
    if teacher.meta.get("val_accuracy") is not None:
        return teacher.val_accuracy
    prefix = layout.teacher_validation(teacher.teacher_hash)  # with its own manifest
    if store.exists(layout.manifest(prefix)):
        accuracy = _recorded_val_accuracy(store, teacher.teacher_hash)
    else:
        data = splits.to(device)
        teacher.model.to(device, memory_format=torch.channels_last)
        accuracy = evaluate_split(teacher.model, data.val, data.mean, data.std)
        try:
            store.put_json(layout.teacher_val_record(teacher.teacher_hash), {"val_accuracy": accuracy},
                           write_once=True)
            store.write_manifest(prefix)
        except WriteConflictError:  # another run recorded it first (bf16 on a GPU may differ slightly)
            accuracy = _recorded_val_accuracy(store, teacher.teacher_hash)
        log.info("teacher %s: validation accuracy %.4f computed and recorded at %s", teacher.teacher_hash,
                 accuracy, store.uri_for(prefix))
    teacher.meta["val_accuracy"] = accuracy
    return accuracy


def _recorded_val_accuracy(store: ArtifactStore, key: str) -> float:
    """The accuracy in teacher `key`'s validation/val.json, checked against its manifest and as a record."""
    raw = store.get_verified(layout.teacher_validation(key), layout.VAL_RECORD)
    try:
        accuracy = json.loads(raw)["val_accuracy"]
    except (ValueError, TypeError, KeyError):  # not UTF-8 JSON, not a mapping, or no val_accuracy
        accuracy = None
    if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise CorruptArtifactError(f"{store.uri_for(layout.teacher_val_record(key))} is corrupt: no val_accuracy "
                                   f"between 0 and 1")
    return float(accuracy)


def ensure_train_logits(store: ArtifactStore, teacher: Teacher, splits: Splits, device: torch.device) -> str:
    """Compute the teacher's logits for the training split once per teacher and store them; return the key.

    Workers then load 2 MB (54k x 10 floats for Fashion-MNIST) instead of each running the teacher over
    the whole training split. Stored ones are checked against their manifest here, on the driver: a corrupt file
    stops the run (CorruptArtifactError naming it) before any worker distills from it.
    """
    prefix = layout.teacher_logits(teacher.teacher_hash)  # with its own manifest
    if store.exists(layout.manifest(prefix)):
        store.verify(prefix)
    else:
        data = splits.to(device)
        teacher.model.to(device, memory_format=torch.channels_last)
        logits = teacher_logits(teacher.model, data.train, data.mean, data.std, output=teacher.task.output).cpu()
        buffer = io.BytesIO()
        torch.save(logits, buffer)
        try:
            store.put_bytes(layout.teacher_train_logits(teacher.teacher_hash), buffer.getvalue(), write_once=True)
            store.write_manifest(prefix)
        except WriteConflictError:  # another run stored them first (bf16 on a GPU may differ slightly)
            log.info("teacher logits %s were stored by another run; using those", prefix)
    return layout.teacher_train_logits(teacher.teacher_hash)


def load_train_logits(store: ArtifactStore, key: str, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The stored training-split logits of teacher `key` (sha256-checked), or None if none are stored; a file
    that is no tensor is a CorruptArtifactError naming it (the pool stops the run on it: no candidate's fault)."""
    prefix = layout.teacher_logits(key)
    if not store.exists(layout.manifest(prefix)):
        return None
    raw = store.get_verified(prefix, layout.TRAIN_LOGITS)
    try:
        logits = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):  # bytes torch cannot load
        logits = None
    if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
        raise CorruptArtifactError(f"{store.uri_for(layout.teacher_train_logits(key))} is corrupt: not a "
                                   f"(samples, classes, ...) tensor of logits")
    return logits
