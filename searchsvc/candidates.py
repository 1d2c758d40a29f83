"""Kept candidates back as models: rebuilt from spec (the history) + weights, and exported."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from core.errors import SearchsvcError
from storage import ArtifactStore, KeyNotFoundError, StoreOptions, check_id, layout, open_store
from workers.evaluation.evaluate import load_candidate_model
from workers.evaluation.spec import CandidateSpec
from workers.measurement import ort
from workers.measurement.measure import unfused_attention
from workers.models.inputs import InputSpec, PartsModel
from workers.training.teacher import load_teacher


def split_candidate_uri(uri_or_hash: str) -> tuple[str | None, str]:
    """'s3://b/p/candidates/<hash>/model.pt' → ('s3://b/p', hash); a bare hash → (None, hash)."""
    marker = "/" + layout.CANDIDATES
    if marker in uri_or_hash:
        store_uri, _, rest = uri_or_hash.partition(marker)
        return store_uri, check_id(rest.split("/")[0], "spec hash")
    return None, check_id(uri_or_hash, "spec hash")


def load_candidate(uri_or_hash: str, store: ArtifactStore | str | None = None,
                   endpoint: str | None = None) -> nn.Module:
    """The kept candidate as a real, smaller nn.Module: eval mode, on the CPU, weights checked by sha256."""
    store_uri, spec_hash = split_candidate_uri(uri_or_hash)
    if not isinstance(store, ArtifactStore):
        store = open_store(store_uri or store, endpoint=endpoint, create=False,
                           options=StoreOptions.from_env())
    return load_candidate_model(store, spec_hash)


def _input_shape(meta: dict, model: nn.Module) -> InputSpec:
    """What the teacher was trained or evaluated on (teachers stored before `in_channels` was recorded: the
    zoo architecture's own channels)."""
    return InputSpec.from_meta(meta, getattr(getattr(model, "arch", None), "in_channels", None))


def candidate_input(store: ArtifactStore, spec_hash: str, model: nn.Module) -> InputSpec:
    """The input shape of the candidate's teacher, for export's example input."""
    spec = CandidateSpec.from_json(store.get_verified(layout.candidate(spec_hash), layout.SPEC).decode())
    return _input_shape(json.loads(store.get_verified(layout.teacher(spec.teacher), layout.META)), model)


def stored_model(store: ArtifactStore, model_hash: str) -> tuple[nn.Module, InputSpec]:
    """A kept candidate (by spec hash) or a teacher (by teacher hash) and its input shape."""
    if store.exists(layout.manifest(layout.candidate(model_hash))):
        model = load_candidate_model(store, model_hash)
        return model, candidate_input(store, model_hash, model)
    if store.exists(layout.teacher_meta(model_hash)):
        teacher = load_teacher(store, model_hash)
        return teacher.model, _input_shape(teacher.meta, teacher.model)
    raise KeyNotFoundError(f"{model_hash} is neither a kept candidate nor a teacher in {store.uri}")


def export_model(model: nn.Module, path: str | Path, shape: InputSpec) -> Path:
    """Write ONNX (.onnx, dynamic batch) or TorchScript (.pt / .ts) depending on the file name. Inputs of several
    parts are the file's inputs by name (ONNX) or its forward's arguments in the data's order (TorchScript)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".onnx":
        path.write_bytes(ort.onnx_bytes(model, shape))  # the model ONNX Runtime times and quantizes
    elif path.suffix in (".pt", ".ts"):
        example: tuple[torch.Tensor, ...] = (shape.example(model),)  # token ids: ones (zeros would be padding)
        if shape.parts is not None:
            model, example = PartsModel(model, shape.parts), tuple(example[0][:, i] for i in range(len(shape.parts)))
        with warnings.catch_warnings(), unfused_attention():  # the fused kernel traces differently per call
            warnings.simplefilter("ignore")
            # The wrapper's re-trace check compares class names the tracer mangles anew (a false alarm): the
            # export test checks the traced file's outputs instead.
            torch.jit.trace(model.eval(), example, check_trace=shape.parts is None, strict=False).save(str(path))
    else:
        raise SearchsvcError(f"-o {path}: use a .onnx, .pt or .ts file name")
    return path
