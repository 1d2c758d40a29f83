"""The config reference (`searchsvc config`, docs/config.md) lists every key of every schema, as the schema says."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from searchsvc.cli import main
from searchsvc.config import JobConfig
from searchsvc.config_reference import REGENERATE, config_keys, render_reference
from searchsvc.methods import get_method, list_methods

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "config.md"


def dataclasses_in(tp: Any) -> Iterator[type]:
    """Every dataclass a field's type holds: itself, or inside an Optional, a union, a tuple, a dict."""
    if dataclasses.is_dataclass(tp):
        yield tp
    for arg in typing.get_args(tp):
        yield from dataclasses_in(arg)


def field_names(schema: type, skip: tuple[str, ...] = ()) -> Counter:
    """How often each field name occurs in `schema` and the dataclasses below it, counted by hand."""
    names: Counter = Counter()
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if f.name in skip:
            continue
        names[f.name] += 1
        for nested in dict.fromkeys(dataclasses_in(hints[f.name])):
            names += field_names(nested)
    return names


def field_at(schema: type, dotted: str) -> tuple[dataclasses.Field, Any]:
    """The field (and its type) a dotted path names, found through dataclasses.fields."""
    head, _, rest = dotted.partition(".")
    f = next(f for f in dataclasses.fields(schema) if f.name == head)
    tp = typing.get_type_hints(schema)[head]
    return field_at(next(dataclasses_in(tp)), rest) if rest else (f, tp)


def text_row(output: str, key: str) -> dict[str, str]:
    """The row of `key` in the plain table, cut at the header's column starts."""
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("key "))
    starts = [header.index(name) for name in ("key", "type", "default", "limits", "help")]
    row = next(line for line in lines if line.split("  ")[0] == key)
    cells = [row[a:b].strip() for a, b in zip(starts, starts[1:] + [None], strict=True)]
    return dict(zip(("key", "type", "default", "limits", "help"), cells, strict=True))


def expected_limit(meta: typing.Mapping[str, Any], tp: Any) -> str:
    """The limit a reader should see, written from the metadata by hand for the cases tested below."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of: " + ", ".join(typing.get_args(tp))
    if "min" in meta and "max" in meta:
        return f"in [{meta['min']}, {meta['max']}]"
    if "gt" in meta and "lt" in meta:
        return f"in ({meta['gt']}, {meta['lt']})"
    return f">= {meta['min']}"


def test_docs_config_md_is_what_the_generator_prints_now() -> None:
    current = render_reference(every_method=True, markdown=True)
    assert DOC.read_text() == current, f"docs/config.md is out of date: regenerate it with `{REGENERATE}` (make docs)"


@pytest.mark.parametrize("method", [None, *list_methods()])
def test_every_field_of_every_schema_has_a_key(method: str | None) -> None:
    expected = field_names(JobConfig, skip=("search",)) + Counter(["search"])  # its keys: the method's schema
    if method is not None:
        expected += field_names(get_method(method).search_schema)
    listed = Counter(key.path.rsplit(".", 1)[-1].removesuffix("[]") for key in config_keys(method))
    assert listed == expected


def test_docs_config_md_has_a_row_for_every_key_of_every_method() -> None:
    text = DOC.read_text()
    for method in list_methods():
        section = text.split(f"## Method {method}\n", 1)[1].split("\n## ", 1)[0]
        search = [key.path for key in config_keys(method) if key.path.split(".")[0].split("[")[0] == "search"]
        assert search and all(f"| `{path}` |" in section for path in search), method
    common = text.split("## Common sections\n", 1)[1].split("\n## ", 1)[0]
    assert all(f"| `{key.path}` |" in common for key in config_keys())


@pytest.mark.parametrize("method, key", [
    ("taylor", "search.iterations"),      # min
    ("taylor", "search.stop.max_drop"),   # inside a nested section
    ("n2n", "search.shrink_share"),       # gt and lt
    ("n2n", "search.agent"),              # a Literal
    ("rigl", "train.distill.alpha"),      # min and max, a common section two levels down
])
def test_a_key_shows_its_default_limit_and_help(method: str, key: str, capsys: pytest.CaptureFixture) -> None:
    schema, dotted = (get_method(method).search_schema, key[len("search."):]) if key.startswith("search.") \
        else (JobConfig, key)
    f, tp = field_at(schema, dotted)
    assert main(["config", method]) == 0
    row = text_row(capsys.readouterr().out, key)
    assert row["default"] == str(f.default)
    assert row["limits"] == expected_limit(f.metadata, tp)
    assert row["help"] == f.metadata["help"]


def test_taylor_iterations_defaults_to_5_at_least_1(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "taylor", "--markdown"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| `search.iterations` |"))
    assert row.split(" | ")[2:4] == ["`5`", ">= 1"]


def test_a_required_key_says_required(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "agp"]) == 0
    assert text_row(capsys.readouterr().out, "search.schedule")["default"] == "required"


def test_config_without_method_lists_the_common_sections_only(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    keys = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[1:] if line]
    sections = {key.split(".")[0] for key in keys}
    assert sections == {f.name for f in dataclasses.fields(JobConfig)}
    assert not any(key.startswith("search.") for key in keys)


def test_unknown_method_is_exit_2_with_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "searchsvc", "config", "tayler"], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'tayler'" in lines[0] and "did you mean 'taylor'" in lines[0]


def test_method_and_all_together_are_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "taylor", "--all"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
