"""Names the user types: registry lookups with a did-you-mean, "module:function" references, and the
checks that tell a true number from YAML's `true`."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Iterable, Mapping, TypeVar

from core.errors import SearchsvcError

T = TypeVar("T")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def lookup(registry: Mapping[str, T], name: str, kind: str, key: str = "") -> T:
    """`registry[name]`, else a SearchsvcError: "key: unknown kind 'name' (did you mean ...); choose one of ..."."""
    if name not in registry:
        where = f"{key}: " if key else ""
        raise SearchsvcError(f"{where}unknown {kind} {name!r}{did_you_mean(name, registry)}; "
                             f"choose one of {', '.join(sorted(registry))}")
    return registry[name]


def load_object(reference: str) -> Any:
    """The object a "package.module:name" reference names, imported when first needed."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def is_int(value: object) -> bool:
    """A true integer: YAML's `true` is a bool, which Python would also accept as the int 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
