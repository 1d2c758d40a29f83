"""YAML as users write it, read strictly: `yaml.safe_load` plus four refusals.

A duplicate key (`epochs: 6` then `epochs: 600`) is an error, not the last one silently winning; an alias
(`*name`) is an error, so no recursive structure and no alias bomb (a few lines that expand to gigabytes)
reaches the validator; nesting deeper than MAX_DEPTH is an error (not a RecursionError); and `read_text` reads
only a regular file of at most MAX_BYTES (a FIFO or a device would block or never end). Errors are
`yaml.YAMLError`s with a line and column, like any YAML syntax error, or `OSError`s with a `strerror`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

MAX_BYTES = 1 << 20  # a config or schedule file: 60,000 grid candidates fit (validated in ~15 s)
MAX_DEPTH = 32  # nested mappings and lists; a config uses 5 (the composer recurses: thousands is a RecursionError)


def read_text(path: str | Path) -> str:
    """The text of the regular file `path` (at most MAX_BYTES, UTF-8). A FIFO, device or folder is refused
    before it is read (opened non-blocking: a FIFO without a writer would wait forever); OSError with a
    `strerror` otherwise (UnicodeDecodeError for bytes that are not UTF-8)."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(handle)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "it is a folder")
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file (a FIFO, socket or device)")
        if info.st_size > MAX_BYTES:
            raise OSError(errno.EFBIG, f"{info.st_size:,} bytes; a config or schedule has at most {MAX_BYTES:,}")
        data = os.read(handle, MAX_BYTES + 1)  # one read: a regular file returns what it has
    finally:
        os.close(handle)
    return data.decode()


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases, duplicate mapping keys and nesting beyond MAX_DEPTH."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ComposerError(None, None, "YAML aliases (*name) are not accepted: write the value out", mark)
        if self._depth >= MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mapping(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping names it
            break
        if duplicate:
            raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_yaml(text: str) -> Any:
    """The YAML document in `text` (safe types only); yaml.YAMLError on bad syntax, an alias or a repeated key."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 — StrictLoader is a SafeLoader
