"""A dataset from the user's code: `dataset: {name: python, factory: "package.module:function", kwargs: {...}}`.

The factory returns its splits as a mapping, `{"train": ..., "test": ..., "val": ...}` (`val` optional: without
it, validation is carved from train by `val_fraction` as for every other source), each a `torch.utils.data`
Dataset of `(input, target)` pairs — map-style (`__len__` and `__getitem__`) or iterable. An input is a tensor,
a numpy array or a PIL image: uint8 images ([C, H, W] of any height and width, or [H, W] for one channel; PIL's
H x W x C is turned around) are normalised as every image source is; floating-point inputs of any shape ([C, H, W]
images, [F] feature vectors, [C, L] sequences) are taken as the model takes them (the user's transform normalised
them); integer inputs are token ids, alone ([L]) or as a dict of parts of one shape, as a tokenizer returns them
(`{"input_ids": ..., "attention_mask": ...}`: the model is called with them as keyword arguments). A target is an
integer class, or — for dense prediction with a `task:` (workers.training.task) — a tensor per example (a [H, W]
mask of classes as integers, or floats), one shape for the whole data, held in memory (a streamed split reads its
targets up front as classes). Every input of the data has one shape and one dtype: the
example input that tracing, MACs, latency and export run on is one of that shape (workers.models.inputs).

`decode` reads every example once into resident tensors (the in-memory fast path, DESIGN: data on the device),
refusing in one line, before decoding it all, data whose decoded size passes streaming.MEMORY_SHARE of the memory
available; `stream` wraps the datasets to be read batch by batch (workers.data.streaming).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from core.errors import SearchsvcError
from core.user_code import import_module_safely, named_callable, try_once_in_child
from workers.data import streaming
from workers.data.sources import Loaded
from workers.data.streaming import Converted, Streamed, batches

SPLITS = ("train", "val", "test")
KEY = "dataset.factory"
Pair = tuple[torch.Tensor, torch.Tensor]  # inputs [N, ...], targets [N]
Names = tuple[str, ...] | None  # a dict input's keys; None: a tensor input
TARGET_BATCH = 256  # examples per batch of the pass that reads a streamed dataset's targets


def factory_of(factory: str) -> Any:
    """The callable `factory` ("package.module:function") names, its module tried in a child process first
    (core.user_code: a module that exits ends a child, not searchsvc); SearchsvcError naming dataset.factory."""
    module_name, sep, attr = factory.partition(":")
    if sep and module_name and attr:
        import_module_safely(module_name, KEY)
    return named_callable(factory, KEY, "not package.module:function")


def call_factory(factory: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's splits, checked to be a mapping with train and test (and maybe val) datasets."""
    function = factory_of(factory)
    try_once_in_child(lambda: function(**kwargs), KEY, f"calling {factory}",
                      same_as=f"{factory}(**{sorted(kwargs.items())!r})")
    try:
        result = function(**kwargs)
    except (Exception, SystemExit) as err:  # noqa: BLE001 — the user's code: whatever it raises is one line
        raise SearchsvcError(f"{KEY}: {factory}(**{dict(kwargs)}) raised {type(err).__name__}: {err}") from None
    if not isinstance(result, Mapping):
        raise SearchsvcError(f"{KEY}: {factory} returned {type(result).__name__}; expected a dict of splits "
                             f"{{train: ..., test: ..., val: ... (optional)}}")
    unknown = sorted(set(map(str, result)) - set(SPLITS))
    if unknown:
        raise SearchsvcError(f"{KEY}: {factory} returned a split named {unknown[0]!r}; the splits are train, val "
                             f"(optional) and test")
    for name in ("train", "test"):
        if result.get(name) is None:
            raise SearchsvcError(f"{KEY}: {factory} returned no {name!r} split (train and test are needed; val is "
                                 f"carved from train when absent)")
    for name, dataset in result.items():
        if dataset is not None and not _is_dataset(dataset):
            raise SearchsvcError(f"{KEY}: split {name!r} is of type {type(dataset).__name__}, not a torch Dataset of "
                                 f"(input, target) pairs (map-style or iterable)")
    return dict(result)


def decode(splits: Mapping[str, Any], factory: str) -> Loaded:
    """The factory's splits (`call_factory`) decoded into resident tensors (uint8 images or float32 inputs, int64
    targets)."""
    available = streaming.available_memory()
    decoded: dict[str, Pair] = {}
    first: torch.Tensor | None = None
    names: Names = None
    for name in SPLITS:
        if splits.get(name) is None:
            continue
        decoded[name], first, names = _decode(splits[name], name, (first, names), available, decoded)
    classes = 1 + max(int(y.max()) for _, y in decoded.values())
    return Loaded(decoded["train"], decoded["test"], classes, val=decoded.get("val"),
                  sources={name: f"python {factory} {name!r}" for name in decoded}, parts=names)


def decoded_bytes(splits: Mapping[str, Any]) -> int | None:
    """What the splits would take decoded, from their lengths and their first example (None: an iterable split,
    whose length is unknown)."""
    total = 0
    for name, dataset in splits.items():
        if dataset is None:
            continue
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            return None
        if len(dataset):
            x, _ = _example(dataset, name, 0)
            total += len(dataset) * x.numel() * x.element_size()
    return total


def stream(splits: Mapping[str, Any], factory: str, workers: int) -> Loaded:
    """The factory's splits read batch by batch (workers.data.streaming): each example checked and converted as
    `decode` does, when it is read. The targets are read once up front (a dataset's `targets`, where it has them
    for every example, else by reading each example)."""
    streamed: dict[str, Streamed] = {}
    first: torch.Tensor | None = None
    for name in SPLITS:
        dataset = splits.get(name)
        if dataset is None:
            continue
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            raise SearchsvcError(f"{KEY}: split {name!r} is an iterable dataset: it streams only in its own order, "
                                 f"and training reads examples in a shuffled one; give a map-style dataset "
                                 f"(__len__ and __getitem__), or dataset.in_memory: true")
        if not len(dataset):
            raise SearchsvcError(f"{KEY}: split {name!r} is empty")
        x, y = _example(dataset, name, 0)
        if isinstance(y, torch.Tensor):
            raise SearchsvcError(f"{KEY}: split {name!r} has a tensor per example as its target; dense targets are "
                                 f"held in memory (dataset.in_memory: true), streamed splits take class targets")
        first = x if first is None else first
        _same_kind(x, first, name, 0)
        unread = Streamed(Converted(dataset, name, _pair), torch.zeros(len(dataset), dtype=torch.int64),
                          tuple(x.shape), x.dtype, workers=workers)
        streamed[name] = replace(unread, labels=_targets(dataset, name, unread))
    classes = 1 + max(int(s.labels.max()) for s in streamed.values())
    return Loaded(streamed["train"], streamed["test"], classes, val=streamed.get("val"),
                  sources={name: f"python {factory} {name!r} (streamed)" for name in streamed})


def _example(dataset: Any, split: str, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
    try:
        item = dataset[index]
    except Exception as err:  # noqa: BLE001 — the user's dataset: reading an example raised
        raise SearchsvcError(f"{KEY}: reading split {split!r} example {index} raised {type(err).__name__}: {err}"
                             ) from None
    return _pair(item, split, index)


def _targets(dataset: Any, split: str, unread: Streamed) -> torch.Tensor:
    """Every example's target: the dataset's `targets` where it has one per example (torchvision's datasets do),
    else every example read once, by the split's own decode workers (`unread`: the split, its labels unknown)."""
    given = getattr(dataset, "targets", None)
    if given is not None and len(given) == len(dataset):
        return torch.tensor([_target(t, split, i) for i, t in enumerate(given)], dtype=torch.int64)
    targets = torch.empty(len(dataset), dtype=torch.int64)
    for index, _, found in batches(unread, TARGET_BATCH):
        targets[index] = found
    return targets


def _is_dataset(value: Any) -> bool:
    if isinstance(value, torch.utils.data.IterableDataset):
        return True
    return hasattr(value, "__getitem__") and hasattr(value, "__len__")


def _items(dataset: Any) -> Iterable[Any]:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return iter(dataset)
    return (dataset[i] for i in range(len(dataset)))


def _decode(dataset: Any, split: str, seen: tuple[torch.Tensor | None, Names], available: int,
            done: dict[str, Pair]) -> tuple[Pair, torch.Tensor, Names]:
    """One split as (inputs [N, ...], targets [N]); `seen`: the data's first input (shape and dtype to match) and
    its parts' names (a dict input's keys, the same in every example), both None before the first split."""
    first, names = seen
    size = len(dataset) if hasattr(dataset, "__len__") else None
    inputs: list[torch.Tensor] = []  # an iterable split's inputs, stacked at the end (its size is not known)
    out: torch.Tensor | None = None  # a map-style split's, each written into its row: the split held once
    dense: torch.Tensor | None = None  # a map-style split's dense targets, alike
    targets: list[int | torch.Tensor | None] = []
    first_target: int | torch.Tensor | None = None  # as read: what every other target must match
    held = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for x, y in done.values())
    try:
        for index, item in enumerate(_items(dataset)):
            x, y = _pair(item, split, index)
            if first is None:
                first, names = x, part_names(item[0])
            _same_kind(x, first, split, index)
            _same_parts(item[0], names, split, index)
            first_target = y if first_target is None else first_target
            _same_target(y, first_target, split, index)
            if index == 0 and size is not None:
                streaming.check_fits(held + size * _bytes(x, y), available, STREAM_HINT)
            held += _bytes(x, y)
            if index % 1024 == 0:
                streaming.check_fits(held, available, STREAM_HINT)
            if size is None:
                inputs.append(x)
            else:
                out = _into(out, size, x, index)
            if isinstance(y, torch.Tensor) and size is not None:  # a dense target: into its row, as the input
                dense = _into_target(dense, size, y, index)
                y = None  # held in `dense` (a view per example would cost an object each)
            targets.append(y)
    except SearchsvcError:
        raise
    except Exception as err:  # noqa: BLE001 — the user's dataset: reading an example raised
        raise SearchsvcError(f"{KEY}: reading split {split!r} example {len(targets)} raised "
                             f"{type(err).__name__}: {err}") from None
    if not targets:
        raise SearchsvcError(f"{KEY}: split {split!r} is empty")
    if dense is not None:
        stacked = dense
    elif isinstance(targets[0], torch.Tensor):  # an iterable split's dense targets
        stacked = _narrowest(torch.stack(targets))
    else:
        stacked = torch.tensor(targets, dtype=torch.int64)
    return (out if out is not None else torch.stack(inputs), stacked), first, names


def _into_target(rows: torch.Tensor | None, size: int, value: torch.Tensor, index: int) -> torch.Tensor:
    """A dense target into row `index` of `rows`: classes below 256 held as uint8 (a mask costs a byte a pixel,
    not eight; the loss widens each batch), widened to int64 at the first larger class; floats as they are."""
    if rows is None:
        rows = torch.empty((size, *value.shape), dtype=_narrowest(value).dtype)
    elif rows.dtype == torch.uint8 and int(value.max()) > 255:
        rows = rows.to(torch.int64)
    rows[index] = value
    return rows


def _narrowest(targets: torch.Tensor) -> torch.Tensor:
    """Integer targets as uint8 where every class is below 256."""
    if targets.is_floating_point() or not len(targets) or int(targets.max()) > 255:
        return targets
    return targets.to(torch.uint8)


def _into(rows: torch.Tensor | None, size: int, value: torch.Tensor, index: int) -> torch.Tensor:
    """`value` written into row `index` of `rows` ([size, *value.shape], made at the first row)."""
    rows = torch.empty((size, *value.shape), dtype=value.dtype) if rows is None else rows
    rows[index] = value
    return rows


def _bytes(x: torch.Tensor, y: int | torch.Tensor) -> int:
    """What one example holds decoded: its input and, for a dense target, the target's tensor."""
    return x.numel() * x.element_size() + (y.numel() * y.element_size() if isinstance(y, torch.Tensor) else 0)


def _pair(item: Any, split: str, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
    """An example as (input tensor, class or dense target); SearchsvcError naming the example if it is neither."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise SearchsvcError(f"{KEY}: split {split!r} example {index} is a {type(item).__name__}, not an "
                             f"(input, target) pair")
    return _input(item[0], split, index), _target(item[1], split, index)


def part_names(value: Any) -> Names:
    """A dict input's keys, in its order (the model's keyword arguments); None for a tensor."""
    return tuple(str(name) for name in value) if isinstance(value, Mapping) else None


def _same_parts(value: Any, names: Names, split: str, index: int) -> None:
    if part_names(value) != names:
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: the input's parts are {part_names(value)}, the "
                             f"data's first input's {names}: every input must have the same keys in the same order")


def _parts(value: Mapping[Any, Any], split: str, index: int) -> torch.Tensor:
    """A dict of token-id tensors of one shape (a tokenizer's input_ids, attention_mask, token_type_ids), packed
    [P, L] in the dict's order: every data path then holds one tensor per example (workers.models.inputs)."""
    where = f"{KEY}: split {split!r} example {index}"
    if not value or not all(isinstance(name, str) and name.isidentifier() for name in value):
        raise SearchsvcError(f"{where}: a dict input maps keyword argument names to tensors, got keys {list(value)}")
    as_ints = lambda t: t.long() if isinstance(t, torch.Tensor) and t.dtype == torch.bool else t  # noqa: E731 — a bool mask
    parts = {name: _input(as_ints(part), split, index) for name, part in value.items()}
    shapes = {tuple(t.shape) for t in parts.values()}
    if any(t.dtype != torch.int64 for t in parts.values()) or len(shapes) != 1:
        kinds = ", ".join(f"{name} {t.dtype} {tuple(t.shape)}" for name, t in parts.items())
        raise SearchsvcError(f"{where}: a dict input's parts are integer tensors of one shape (token ids, attention "
                             f"mask, token type ids), got {kinds}")
    return torch.stack(list(parts.values()))


def _input(value: Any, split: str, index: int) -> torch.Tensor:
    if isinstance(value, Mapping):
        return _parts(value, split, index)
    if hasattr(value, "mode") and hasattr(value, "size") and not isinstance(value, (torch.Tensor, np.ndarray)):
        array = np.asarray(value)  # a PIL image: H x W (x C), uint8
        value = torch.from_numpy(array.copy()).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array.copy())
    elif isinstance(value, np.ndarray):
        value = torch.from_numpy(value.copy())
    if not isinstance(value, torch.Tensor):
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: the input is a {type(value).__name__}; "
                             f"expected a tensor, a numpy array or a PIL image")
    if value.dtype == torch.uint8:
        if value.ndim == 2:
            value = value.unsqueeze(0)  # one channel
        if value.ndim != 3:
            raise SearchsvcError(f"{KEY}: split {split!r} example {index}: a uint8 input of shape "
                                 f"{tuple(value.shape)}; uint8 inputs are images, [C, H, W] or [H, W] (other inputs: "
                                 f"as floats)")
        return value.contiguous()
    if value.ndim == 0 or value.numel() == 0:
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: an input of shape {tuple(value.shape)}; "
                             f"expected one or more values per example")
    if not value.is_floating_point():
        if value.dtype == torch.bool or value.min() < 0:
            raise SearchsvcError(f"{KEY}: split {split!r} example {index}: inputs of dtype {value.dtype}; expected "
                                 f"uint8 images, floating-point inputs or token ids (integers >= 0)")
        return value.to(torch.int64).contiguous()  # token ids
    value = value.float().contiguous()
    if not torch.isfinite(value).all():
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: the input holds NaN or infinity")
    return value


def _target(value: Any, split: str, index: int) -> int | torch.Tensor:
    """A class (an integer >= 0), or a dense target: a tensor of more than one value (integers >= 0 as int64 —
    classes per position — or finite floats as float32)."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value.copy())
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        return _dense_target(value, split, index)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    elif isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: the target {value!r} is not a class "
                             f"(an integer >= 0) or a tensor per example")
    return value


def _dense_target(value: torch.Tensor, split: str, index: int) -> torch.Tensor:
    where = f"{KEY}: split {split!r} example {index}: the target"
    if value.is_floating_point():
        if not torch.isfinite(value).all():
            raise SearchsvcError(f"{where} holds NaN or infinity")
        return value.float().contiguous()
    if value.dtype == torch.bool or value.min() < 0:
        raise SearchsvcError(f"{where} holds {'booleans' if value.dtype == torch.bool else 'negative values'}; a "
                             f"dense target of classes holds integers >= 0")
    return value.to(torch.int64).contiguous()


def _same_target(y: int | torch.Tensor, first: int | torch.Tensor, split: str, index: int) -> None:
    kind = lambda t: (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else "a class"  # noqa: E731
    if kind(y) != kind(first):
        raise SearchsvcError(f"{KEY}: split {split!r} example {index}: the target is {kind(y)}, the split's first "
                             f"{kind(first)}: every target must be of one kind and shape")


def _same_kind(x: torch.Tensor, first: torch.Tensor, split: str, index: int) -> None:
    if x.shape != first.shape or x.dtype != first.dtype:
        raise SearchsvcError(f"{KEY}: split {split!r} example {index} is {x.dtype} of shape {tuple(x.shape)}, the "
                             f"data's first input {first.dtype} of shape {tuple(first.shape)}: every input must "
                             f"have one shape and dtype")


STREAM_HINT = "a map-style dataset streams (dataset.in_memory: auto or false); an iterable one is decoded whole"
