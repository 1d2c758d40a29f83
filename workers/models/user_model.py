"""The user's own network: a constructor named in the config, its keyword arguments, and a weights file.

    teacher:
      model: torchvision:resnet18        # a torchvision classification model, timm:NAME, or "package.module:factory"
      kwargs: {num_classes: 10}          # passed to the constructor
      weights: my_resnet18.pt            # a state_dict: .pt / .pth (weights_only) or .safetensors

Nothing here unpickles code: a constructor is imported by name and weights are plain tensors. Every
problem (no such constructor, a factory that raises, a file that is not a state_dict, a tensor of the
wrong shape, logits that do not match the classes) is one SearchsvcError line naming the key or file.
"""

from __future__ import annotations

import hashlib
import importlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import SearchsvcError, first_line
from core.names import did_you_mean
from core.user_code import import_module_safely, named_callable, try_once_in_child
from workers.models.inputs import InputSpec, keyword_inputs
from workers.models.zoo import load_tensors

TORCHVISION = "torchvision:"
TIMM = "timm:"
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class ModelSource:
    """A user model as data: what builds it and which weights it starts from (sha256 of the file's bytes)."""

    model: str  # "torchvision:resnet18" or "package.module:factory"
    kwargs: Mapping[str, Any]
    weights_sha256: str | None = None  # None: fresh weights (the teacher is trained)

    def to_data(self) -> dict[str, Any]:
        return {"model": self.model, "kwargs": dict(self.kwargs), "weights_sha256": self.weights_sha256}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> ModelSource:
        return cls(str(data["model"]), dict(data.get("kwargs") or {}), data.get("weights_sha256"))


def constructor(model: str) -> Callable[..., nn.Module]:
    """The callable `model` names; SearchsvcError naming teacher.model if there is none."""
    if model.startswith(TORCHVISION):
        from torchvision import models

        name = model[len(TORCHVISION):]
        known = models.list_models(module=models)  # classification models only
        if name not in known:
            raise SearchsvcError(f"teacher.model: torchvision has no classification model {name!r}"
                                 f"{did_you_mean(name, known)}")
        return lambda **kwargs: models.get_model(name, **kwargs)
    if model.startswith(TIMM):
        return _timm_constructor(model[len(TIMM):])
    return named_callable(model, "teacher.model", "neither torchvision:NAME, timm:NAME nor package.module:factory")


TRUSTED_PACKAGES = ("torch", "torchvision", "timm")  # libraries, not the user's code: not tried in a child


def try_in_a_child(source: ModelSource) -> None:
    """The user's module imported, then its factory called, in a forked child first (core.user_code):
    SearchsvcError naming teacher.model if either ends, kills or hangs its process — then it ends a child, not
    searchsvc. The driver calls this before it builds the model itself; torchvision's and timm's are not
    the user's code."""
    module_name, sep, attr = source.model.partition(":")
    if not (sep and module_name and attr) or module_name.partition(".")[0] in TRUSTED_PACKAGES:
        return  # `constructor` names a malformed name; torchvision.models.x:Y is not the user's code
    import_module_safely(module_name, "teacher.model")
    try:  # imported here too once it is known not to end the process: the factory's child inherits it
        factory = getattr(importlib.import_module(module_name), attr)
    except (Exception, SystemExit):
        return  # `constructor` names it, in one line
    try_once_in_child(lambda: factory(**source.kwargs), "teacher.model", f"calling {source.model}",
                      same_as=f"{source.model}(**{sorted(source.kwargs.items())!r})")


def _timm_constructor(name: str) -> Callable[..., nn.Module]:
    """timm's `create_model(name, pretrained=False, **kwargs)`; SearchsvcError if timm or the name is missing."""
    try:
        import timm
    except ImportError:
        raise SearchsvcError("teacher.model: timm is not installed (pip install 'searchsvc[timm]')") from None
    known = timm.list_models()
    if name not in known:
        raise SearchsvcError(f"teacher.model: timm has no model {name!r}{did_you_mean(name, known)}")
    return lambda **kwargs: timm.create_model(name, pretrained=False, **kwargs)


def construct(source: ModelSource, inputs: InputSpec | None = None) -> nn.Module:
    """A fresh instance of the user's model (random weights), on the CPU; taking `inputs`' packed parts as its
    keyword arguments where the data has several (workers.models.inputs.keyword_inputs)."""
    if "weights" in source.kwargs and source.model.startswith(TORCHVISION):
        raise SearchsvcError("teacher.kwargs.weights: torchvision's pretrained weights are downloaded, and runs "
                             "download nothing; save them once and give the file as teacher.weights")
    loading = sorted({"pretrained", "pretrained_cfg_overlay", "checkpoint_path"} & set(source.kwargs))
    if loading and source.model.startswith(TIMM):
        raise SearchsvcError(f"teacher.kwargs.{loading[0]}: timm's weights are downloaded or read by timm, and runs "
                             f"download nothing; save them once as a state_dict and give the file as teacher.weights")
    factory = constructor(source.model)
    try:
        model = factory(**source.kwargs)
    except (Exception, SystemExit) as err:  # noqa: BLE001 — the user's code: whatever it raises is one line
        raise SearchsvcError(f"teacher.model: {source.model}(**{dict(source.kwargs)}) raised "
                             f"{type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise SearchsvcError(f"teacher.model: {source.model} returned {type(model).__name__}, not a torch nn.Module")
    return keyword_inputs(model, inputs)


def read_weights(raw: bytes, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from a file's bytes (`where` names the file, its suffix the format)."""
    if where.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(raw)
        except Exception as err:  # noqa: BLE001 — a damaged file, whatever safetensors raises
            raise SearchsvcError(f"teacher.weights: {where} is not a readable safetensors file ({err})") from None
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — a pickled model, a damaged file: torch raises many kinds
        raise SearchsvcError(f"teacher.weights: {where} cannot be loaded with weights_only=True ({first_line(err)}); save "
                             f"model.state_dict() with torch.save, not the model") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a training checkpoint
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise SearchsvcError(f"teacher.weights: {where} holds {type(state).__name__}, not a state_dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise SearchsvcError(f"teacher.weights: {where} is not a state_dict: {key!r} is {type(value).__name__}")
    return state


def weights_file(location: str, endpoint: str | None = None) -> tuple[bytes, str]:
    """The bytes of a weights file (a path, file:// or s3:// URI) and their sha256 (hex); SearchsvcError naming
    it otherwise. `endpoint`: the S3 endpoint of an s3:// URI (the run's store's, else boto3's default)."""
    if not location.endswith(WEIGHT_SUFFIXES):
        raise SearchsvcError(f"teacher.weights: {location}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    if location.startswith("s3://"):
        from storage import KeyNotFoundError, open_store

        folder, _, name = location.rpartition("/")
        try:
            raw = open_store(folder, endpoint=endpoint, create=False).get_bytes(name)
        except KeyNotFoundError:
            raise SearchsvcError(f"teacher.weights: {location}: no such object") from None
    else:
        try:
            raw = Path(location.removeprefix("file://")).read_bytes()
        except FileNotFoundError:
            raise SearchsvcError(f"teacher.weights: {location}: no such file") from None
        except OSError as err:
            raise SearchsvcError(f"teacher.weights: {location}: cannot read ({err.__class__.__name__})") from None
    return raw, hashlib.sha256(raw).hexdigest()


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """Load `state` into `model`, every tensor by name and shape; the first mismatch is named with both shapes."""
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    for key, tensor in own.items():
        if key not in state:
            more = sum(k not in state for k in own) - 1
            raise SearchsvcError(f"teacher.weights: {where} has no tensor {key!r}" + (f" (and {more} more)" if more
                                 else "") + "; does teacher.kwargs build the model that was saved?")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise SearchsvcError(f"teacher.weights: {where}: {key} has shape {tuple(state[key].shape)} in the file "
                                 f"but {tuple(tensor.shape)} in the model (teacher.kwargs, e.g. num_classes?)")
    extra = [k for k in state if k not in own]
    if extra:
        raise SearchsvcError(f"teacher.weights: {where} has tensors the model lacks, first {extra[0]!r}"
                             f" ({len(extra)} in all)")
    load_tensors(model, state)
    return model


def check_outputs(model: nn.Module, inputs: InputSpec, num_classes: int | None, task: Any = None) -> None:
    """One forward pass at the dataset's shape: it must run and give `num_classes` logits per example (None: any
    number, when only the files know the classes). With a `task:` (its TaskConfig) the outputs may be a tensor, or
    a dict or tuple of tensors, each with the batch first (a [N, C, H, W] mask of logits per example, say), and the
    prediction among them floating point: what the metric scores and distillation matches."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(inputs.batch(2))
    except Exception as err:  # noqa: BLE001 — the user's model: whatever it raises is one line
        raise SearchsvcError(f"teacher.model: fails on inputs of shape {inputs} (the data's; {first_line(err)}); "
                             f"see dataset.channels and dataset.image_size") from None
    if task is not None:
        from workers.training.task import output_tensors, prediction

        tensors = output_tensors(out) if isinstance(out, (torch.Tensor, dict, tuple, list)) else {}
        if not tensors or any(t.dim() < 2 or t.shape[0] != 2 for t in tensors.values()):
            raise SearchsvcError(f"teacher.model: gives {type(out).__name__} outputs for 2 examples; a task's "
                                 f"network returns a tensor (or a dict or tuple of them) with the batch first")
        predicted = prediction(out, task.output)
        if not isinstance(predicted, torch.Tensor) or not predicted.is_floating_point():
            kind = f"{predicted.dtype} tensor" if isinstance(predicted, torch.Tensor) else type(predicted).__name__
            raise SearchsvcError(f"task.output: the prediction is a {kind}; distillation matches (and the metric "
                                 f"scores) floating-point scores per example — name the output that holds them")
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or \
            (num_classes is not None and out.shape[1] != num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SearchsvcError(f"teacher.model: gives outputs of shape {shape} for 2 examples; the dataset has "
                             f"{num_classes} classes, so (2, {num_classes}) logits are needed "
                             f"(teacher.kwargs.num_classes?)")
