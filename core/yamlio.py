"""YAML as users write it, read strictly: `yaml.safe_load` plus two refusals.

A duplicate key (`epochs: 6` then `epochs: 600`) is an error, not the last one silently winning; an alias
(`*name`) is an error, so no recursive structure and no alias bomb (a few lines that expand to gigabytes)
reaches the validator. Errors are `yaml.YAMLError`s with a line and column, like any YAML syntax error.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses aliases and duplicate mapping keys."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise ComposerError(None, None, "YAML aliases (*name) are not accepted: write the value out", mark)
        return super().compose_node(parent, index)


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
