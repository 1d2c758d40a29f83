"""The config reference, generated from the schemas: every key of a job config with its type, default, limits
and help (`searchsvc config [METHOD]`, docs/config.md).

Only public entry points are read — `searchsvc.config.JobConfig`, `searchsvc.methods.get_method` /
`list_methods` and `dataclasses.fields` — so the reference follows the schemas wherever their modules live.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union

COLUMNS = ("key", "type", "default", "limits", "help")
REGENERATE = "searchsvc config --all --markdown > docs/config.md"  # what `make docs` runs
SEARCH_HELP = "the method's own section: `searchsvc config METHOD` lists its keys"


@dataclass(frozen=True)
class ConfigKey:
    """One key of a config: its dotted path and what the schema says of it."""

    path: str  # dotted; `[]` marks the items of a list, e.g. search.candidates[].scale
    type: str
    default: str  # "required" when the key has no default
    limits: str
    help: str

    def cells(self) -> tuple[str, ...]:
        """The row in COLUMNS order."""
        return (self.path, self.type, self.default, self.limits, self.help)


# ---- walking a schema ---------------------------------------------------------------------------
def schema_keys(schema: type, prefix: str = "") -> Iterator[ConfigKey]:
    """One entry per field of the dataclass `schema`, each nested dataclass's fields under its own path."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not f.init:  # computed, not read from the config
            continue
        tp, path = hints[f.name], prefix + f.name
        yield ConfigKey(path, type_text(tp, top=True), default_text(f), limits_text(tp, f.metadata),
                        help_text(tp, f.metadata))
        for nested, suffix in nested_schemas(tp):
            yield from schema_keys(nested, f"{path}{suffix}.")


def nested_schemas(tp: Any) -> list[tuple[type, str]]:
    """The dataclasses inside a field's type with the path suffix of their keys ("" or "[]" for list items)."""
    if dataclasses.is_dataclass(tp):
        return [(tp, "")]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        found = [pair for arg in args for pair in nested_schemas(arg)]
        return list(dict.fromkeys(found))  # `A | A`-like repeats listed once
    if origin is tuple:
        return [(cls, "[]" + suffix) for arg in args if arg is not Ellipsis for cls, suffix in nested_schemas(arg)]
    if origin is dict and args:
        return [(cls, ".<key>" + suffix) for cls, suffix in nested_schemas(args[1])]
    return []


# ---- one cell each ------------------------------------------------------------------------------
_SCALARS = {str: "string", int: "int", float: "float", bool: "bool", type(None): "null"}


def type_text(tp: Any, top: bool = False) -> str:
    """A short readable type: `int | null`, `list of float`, `{low, high}`; `top`: a field's own type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):  # a field's own section, or a mapping inside a list / union
        return "section" if top else "{" + ", ".join(f.name for f in dataclasses.fields(tp) if f.init) + "}"
    if origin is Literal:  # the values are the limits of a field; inside a list they are the type
        return _literal_kind(args) if top else " | ".join(value_text(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        ordered = options + [a for a in args if a is type(None)]  # null last
        return " | ".join(type_text(a, top and len(options) == 1) for a in ordered)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = type_text(args[0])
            return f"list of ({item})" if " | " in item else f"list of {item}"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict or tp is dict:
        if not args or args[1] is Any:
            return "mapping"
        return "{" + f"{type_text(args[0])}: {type_text(args[1])}" + "}"
    return _SCALARS.get(tp, getattr(tp, "__name__", str(tp)))


def _literal_kind(values: tuple) -> str:
    kinds = dict.fromkeys(_SCALARS.get(type(v), "value") for v in values)
    return " | ".join(kinds)


def default_text(f: dataclasses.Field) -> str:
    """The field's default as one would write it in YAML; `default_factory` evaluated; "required" without one."""
    if f.default is not dataclasses.MISSING:
        return value_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return value_text(f.default_factory())
    return "required"


def value_text(value: Any) -> str:
    """A value in YAML's flow style; a record shows only the keys that differ from their defaults."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value.strip() == value and value else f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value):
        fresh = _fresh(type(value))
        return value_text({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                           if f.init and (fresh is None or getattr(value, f.name) != getattr(fresh, f.name))})
    return str(value)


def _fresh(cls: type) -> Any:
    """`cls()` with every default (what an empty mapping in the config gives), or None where a key is required."""
    try:
        return cls()
    except (TypeError, ValueError):
        return None


def limits_text(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    """Bounds and allowed values: `>= 1`, `in (0, 1]`, `one of: ppo, random`."""
    parts = [bounds_text(meta)]
    choices = meta.get("choices")
    if choices is not None:
        parts.append(_one_of(choices() if callable(choices) else choices))
    literal = _literal_values(tp)
    if literal:
        parts.append(_one_of(literal))
    return "; ".join(p for p in parts if p)


def bounds_text(meta: typing.Mapping[str, Any]) -> str:
    """min / max (inclusive) and gt / lt (exclusive) as `>= 0`, `< 1` or, with both ends, `in [0, 1)`."""
    low = ("[", ">=", meta["min"]) if "min" in meta else ("(", ">", meta["gt"]) if "gt" in meta else None
    high = ("]", "<=", meta["max"]) if "max" in meta else (")", "<", meta["lt"]) if "lt" in meta else None
    if low and high:
        return f"in {low[0]}{value_text(low[2])}, {value_text(high[2])}{high[0]}"
    end = low or high
    return f"{end[1]} {value_text(end[2])}" if end else ""


def _literal_values(tp: Any) -> tuple:
    """A Literal field's values (also inside `Literal[...] | None`)."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(v for arg in typing.get_args(tp) for v in _literal_values(arg))
    return ()


def _one_of(values: typing.Iterable[Any]) -> str:
    return "one of: " + ", ".join(value_text(v) for v in values)


def help_text(tp: Any, meta: typing.Mapping[str, Any]) -> str:
    """The field's help; for a section without one, the first paragraph of its dataclass's docstring."""
    if meta.get("help"):
        return str(meta["help"])
    sections = nested_schemas(tp)
    return class_summary(sections[0][0]) if sections else ""


def class_summary(cls: type) -> str:
    """The first paragraph of a dataclass's own docstring, on one line ("" for the generated signature)."""
    doc = inspect.getdoc(cls) or ""
    if not cls.__dict__.get("__doc__") or doc.startswith(f"{cls.__name__}("):
        return ""
    return " ".join(doc.split("\n\n")[0].split())


# ---- the reference of a job config --------------------------------------------------------------
def config_keys(method: str | None = None) -> list[ConfigKey]:
    """Every key of a job config: the sections all methods share, and `method`'s `search:` keys when given."""
    from searchsvc.config import JobConfig

    keys: list[ConfigKey] = []
    for key in schema_keys(JobConfig):
        if key.path.startswith(("search.", "search[")):  # a typed `search:` (a union of the methods' schemas)
            continue                                      # is listed per method, by search_keys
        if key.path != "search":
            keys.append(key)
        elif method is None:
            keys.append(dataclasses.replace(key, type="section", default="{}", help=SEARCH_HELP))
        else:
            keys.extend(search_keys(method))
    return keys


def search_keys(method: str) -> list[ConfigKey]:
    """The `search:` section of `method` and each of its keys; a SearchsvcError with a did-you-mean if unknown."""
    from searchsvc.methods import get_method

    entry = get_method(method)
    schema = entry.search_schema
    required = any(k.default == "required" for k in schema_keys(schema) if k.path.count(".") == 0)
    head = ConfigKey("search", "section", "required" if required else "{}", "",
                     f"method {method}: {entry.description}")
    return [head, *schema_keys(schema, "search.")]


def method_names() -> list[str]:
    """The registered methods, in the registry's order."""
    from searchsvc.methods import list_methods

    return list(list_methods())


# ---- rendering ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One table of the reference: a heading, a sentence under it, its keys."""

    heading: str
    intro: str
    keys: list[ConfigKey]


def reference_blocks(method: str | None = None, every_method: bool = False) -> list[Block]:
    """What `searchsvc config` prints: the common sections (with `method`'s search keys), or all of them."""
    if method is not None:
        return [Block(f"Method {method}", f"Every key of a `method: {method}` job, its `search:` section included.",
                      config_keys(method))]
    common = Block("Common sections", "The keys every method shares; `search:` holds the method's own, "
                   + ("below." if every_method else "listed by `searchsvc config METHOD`."), config_keys())
    if not every_method:
        return [common]
    from searchsvc.methods import get_method

    return [common, *(Block(f"Method {name}", f"`method: {name}`: {get_method(name).description}. "
                            f"Its `search:` keys:", search_keys(name)) for name in method_names())]


def format_text(blocks: list[Block]) -> str:
    """Plain aligned tables, a blank line between sections; with several blocks, each under its heading."""
    out: list[str] = []
    for block in blocks:
        if len(blocks) > 1:
            out += [f"== {block.heading} ==", block.intro, ""]
        out += _aligned([COLUMNS, *(_spaced(block.keys))]) + [""]
    return "\n".join(out)


def _spaced(keys: list[ConfigKey]) -> list[tuple[str, ...]]:
    """The rows, with an empty row where a section of several keys starts or ends."""
    rows: list[tuple[str, ...]] = []
    for i, key in enumerate(keys):
        section = key.path.split(".")[0].split("[")[0]
        before = keys[i - 1].path.split(".")[0].split("[")[0] if i else section
        grouped = any(k.path.startswith(f"{name}.") for k in keys for name in (section, before))
        if section != before and grouped:
            rows.append(("",) * len(COLUMNS))
        rows.append(key.cells())
    return rows


# Columns wider than these are let run over (that row only), so one long default does not widen every row.
_TEXT_WIDTHS = (40, 28, 24, 30)


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [min(max(len(row[i]) for row in rows), cap) for i, cap in enumerate(_TEXT_WIDTHS)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
            if any(row) else "" for row in rows]


def format_markdown(blocks: list[Block], title: str) -> str:
    """A Markdown page: the title, how to read it and how it was made, a table per block."""
    anchors = " · ".join(f"[{b.heading}](#{b.heading.lower().replace(' ', '-')})" for b in blocks)
    out = [f"# {title}", "",
           f"<!-- Generated from the config schemas by `{REGENERATE}` (`make docs`). Do not edit by hand. -->", "",
           ("Every key of a job config (YAML), generated from the schemas `searchsvc validate` checks a config "
            "against. A nested key is dotted: `train.distill.alpha` is `alpha` inside `distill:` inside `train:`; "
            "`[]` stands for each item of a list (`search.candidates[].scale`). A key left out takes its default; "
            "a *required* key has none. `searchsvc config METHOD` prints the same in a terminal."), ""]
    if len(blocks) > 1:
        out += [anchors, ""]
    for block in blocks:
        out += [f"## {block.heading}", "", block.intro, "",
                "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        out += [_markdown_row(key) for key in block.keys] + [""]
    return "\n".join(out)


def _markdown_row(key: ConfigKey) -> str:
    default = "*required*" if key.default == "required" else _code(key.default)
    cells = (_code(key.path), key.type, default, key.limits, key.help)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def render_reference(method: str | None = None, every_method: bool = False, markdown: bool = False) -> str:
    """The reference `searchsvc config` prints: text, or Markdown (with `every_method`: docs/config.md)."""
    blocks = reference_blocks(method, every_method)
    if not markdown:
        return format_text(blocks)
    title = "Config reference" + (f": method {method}" if method else "" if every_method else ": common sections")
    return format_markdown(blocks, title)
