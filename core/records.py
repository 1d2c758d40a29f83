"""Typed records ⇄ plain data (what YAML and JSON hold), with every problem named by its key path.

Frozen dataclasses are the records: job configs, candidate specs, teacher recipes. `from_data` builds
one from a dict and collects *all* problems (`train.epochs: must be a positive integer, got -1`)
before raising one `RecordError`. Field constraints are plain data in the field's metadata, so the
packages that define records need nothing from here:

    epochs: int = field(default=1, metadata={"min": 1, "help": "passes over the training set"})

A record may check rules across its fields in `__post_init__` by raising ValueError("key: message"), or
ValueError(": message") for a rule on the record as a whole.
Metadata keys: min / max (inclusive), gt / lt (exclusive), choices (a list, or a callable returning
one, for registries), help (shown by `--help`-style listings), omit_default (a field added after stores
existed: `to_data` leaves it out while it holds its default, so adding it changes no stored hash),
schema_from ((key, function): a section whose schema the value of an earlier key decides — the function maps
that value to the schema, or None when the key's value has its own problem).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from typing import Any, Literal, Union

from core.errors import SearchsvcError
from core.names import did_you_mean, is_int, is_number

_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads 1e-3 as a string
MAX_SEED = 2**32 - 1  # the bound of every seed key: torch.manual_seed overflows past 2**64, NumPy past 2**32


class RecordError(SearchsvcError):
    """One or more problems in user data; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in problems))


def to_data(record: Any) -> Any:
    """A record as plain dicts, lists and scalars (tuples become lists), ready for JSON or YAML."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return {f.name: to_data(getattr(record, f.name)) for f in dataclasses.fields(record)
                if not (f.metadata.get("omit_default") and _is_default(f, getattr(record, f.name)))}
    if isinstance(record, (list, tuple)):
        return [to_data(v) for v in record]
    if isinstance(record, dict):
        return {str(k): to_data(v) for k, v in record.items()}
    return record


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return value == default


def canonical_json(record: Any) -> str:
    """Sorted keys, no whitespace: the form that identities (spec_hash, teacher_hash) are taken of."""
    return json.dumps(to_data(record), sort_keys=True, separators=(",", ":"), allow_nan=False)


def from_data(cls: type, data: Any, path: str = "", source: str = "") -> Any:
    """Build the dataclass `cls` from plain `data`; raise RecordError listing every problem."""
    problems: list[str] = []
    value = _convert(cls, data, path, problems)
    if problems:
        raise RecordError(problems, source)
    return value


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return json.dumps(value) if isinstance(value, (bool, int, float)) else repr(value)


def _name(path: str) -> str:
    return path or "<top level>"


def _convert(tp: Any, value: Any, path: str, problems: list[str], meta: dict | None = None) -> Any:
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path, problems, meta)
    if dataclasses.is_dataclass(tp):
        return _convert_record(tp, value, path, problems)
    if origin is Literal:
        if value not in args:
            options = ", ".join(str(a) for a in args)
            problems.append(f"{_name(path)}: must be one of {options}; got {_describe(value)}{did_you_mean(value, args)}")
        return value
    if origin is tuple:
        return _convert_tuple(args, value, path, problems)
    if origin is dict or tp is dict:
        return _convert_mapping(args, value, path, problems)
    return _convert_scalar(tp, value, path, problems, meta)


def _convert_mapping(args: tuple, value: Any, path: str, problems: list[str]) -> dict:
    """A `dict[K, V]` field: every key and value checked as K and V (a bare `dict` takes any)."""
    if not isinstance(value, dict):
        problems.append(f"{_name(path)}: must be a mapping, got {_describe(value)}")
        return {}
    if not args:
        return dict(value)
    key_type, value_type = args
    return {_convert(key_type, k, f"{path}.{k}", problems): _convert(value_type, v, f"{path}.{k}", problems)
            for k, v in value.items()}


def _convert_union(args: tuple, value: Any, path: str, problems: list[str], meta: dict) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    exact = type(value) if type(value) in (bool, int, float, str) else None
    if exact in options:  # `int | float` given 3: check it as the int it is, bounds included
        return _convert(exact, value, path, problems, meta)
    for option in options:
        trial: list[str] = []
        converted = _convert(option, value, path, trial, meta)
        if not trial:
            return converted
    if len(options) == 1:
        return _convert(options[0], value, path, problems, meta)
    literals = [a for option in options if typing.get_origin(option) is Literal for a in typing.get_args(option)]
    if literals and all(typing.get_origin(o) is Literal or o is bool for o in options):  # e.g. bool | "auto"
        named = (["true", "false"] if bool in options else []) + [str(a) for a in literals]
        problems.append(f"{_name(path)}: must be {', '.join(named[:-1])} or {named[-1]}; got {_describe(value)}")
        return value
    # Report the first option's problem (the most specific one for int | float style unions).
    _convert(options[-1], value, path, problems, meta)
    return value


def _convert_record(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{_name(path)}: must be a mapping, got {_describe(value)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    before = len(problems)
    for key in value:
        if key not in fields:
            where = f"{path}.{key}" if path else str(key)
            problems.append(f"{where}: unknown key{did_you_mean(key, fields)}")
    hints = typing.get_type_hints(cls)
    kwargs, missing = {}, False
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if "schema_from" in f.metadata:  # a section whose schema another key names (`search:` by `method:`)
            key, schema_of = f.metadata["schema_from"]
            schema = schema_of(kwargs[key]) if key in kwargs else None  # else: that key's own problem is reported
            if schema is not None:
                kwargs[name] = _convert(schema, value.get(name) or {}, where, problems)
        elif name in value:
            kwargs[name] = _convert(hints[name], value[name], where, problems, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}: missing required key")
            missing = True
    if missing or len(problems) > before:  # not built: its __post_init__ would see unchecked values
        return None
    try:
        return cls(**kwargs)
    except ValueError as err:  # a rule across fields, checked in __post_init__: "key: message" (": message":
        text = str(err)         # the record as a whole)
        if text.startswith(": "):
            problems.append(f"{path}{text}" if path else text[2:])
        else:
            problems.append(f"{path}.{text}" if path else text)
        return None


def _convert_tuple(args: tuple, value: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, (list, tuple)):
        problems.append(f"{_name(path)}: must be a list, got {_describe(value)}")
        return ()
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value))
    if len(args) != len(value):
        problems.append(f"{_name(path)}: must be a list of {len(args)} items, got {len(value)}")
        return tuple(value)
    return tuple(_convert(a, v, f"{path}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, path: str, problems: list[str], meta: dict) -> Any:
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: is_int(value),
        float: is_number(value),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"records: unsupported field type {tp!r} at {path}")
    if not ok:
        problems.append(f"{_name(path)}: {_expected(tp, meta)}, got {_describe(value)}")
        return value
    if tp is float:
        value = float(value)
        if not math.isfinite(value):  # .nan, .inf, 1e400: no training or JSON record survives them
            problems.append(f"{_name(path)}: must be a finite number, got {value}")
            return value
    if tp in (int, float) and not _in_bounds(value, meta):
        problems.append(f"{_name(path)}: {_expected(tp, meta)}, got {_describe(value)}")
    choices = meta.get("choices")
    if choices is not None:
        options = list(choices() if callable(choices) else choices)
        if value not in options:
            listed = ", ".join(str(o) for o in options)
            problems.append(f"{_name(path)}: unknown value {_describe(value)}{did_you_mean(value, options)}; choose one of {listed}")
    return value


def _in_bounds(value: float, meta: dict) -> bool:
    return not (
        ("min" in meta and value < meta["min"])
        or ("max" in meta and value > meta["max"])
        or ("gt" in meta and value <= meta["gt"])
        or ("lt" in meta and value >= meta["lt"])
    )


def _expected(tp: type, meta: dict) -> str:
    noun = {bool: "true or false", int: "integer", float: "number", str: "a string"}[tp]
    if tp in (bool, str):
        return f"must be {noun}"
    low = meta.get("min", meta.get("gt"))
    high = meta.get("max", meta.get("lt"))
    if high is None and (meta.get("gt") == 0 or (meta.get("min") == 1 and tp is int)):
        return f"must be a positive {noun}"
    if high is None and meta.get("min") == 0:
        return f"must be a non-negative {noun}"
    if low is None and high is None:
        return f"must be {'an' if tp is int else 'a'} {noun}"
    left = "[" if "min" in meta else "("
    right = "]" if "max" in meta else ")"
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"must be {'an' if tp is int else 'a'} {noun} in {left}{lo}, {hi}{right}"
