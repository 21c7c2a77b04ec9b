"""YAML reading through libyaml's C parser when PyYAML was built with it.

The pure-Python parser took about a third of a second of every definitions load (contract,
instruments, model sidecars, suites) and of every ingest's set-up; the C parser reads the same
safe subset with the same marks (line numbers) in errors and on nodes.

A mapping that names a key twice is an error (YAML 1.2 says keys are unique; PyYAML keeps the
last silently): in an instrument definition or a parameter file, the second value of a cutoff or
reliable change would replace the first without anyone seeing it.
"""

from __future__ import annotations

from typing import IO, Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SafeLoader(_Base):  # type: ignore[misc, valid-type]
    """The safe loader (C parser when available) that refuses a key given twice in a mapping."""


def _unique_mapping(loader: SafeConstructor, node: yaml.MappingNode, deep: bool = False) -> Any:
    # Only the mapping's own keys: a key merged in with `<<` may be overridden, as YAML allows.
    own = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
    first: dict[Any, int] = {}
    for key_node in own:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # (SafeConstructor reports an unhashable key itself)
        if key in first:
            raise ConstructorError(
                "while reading a mapping", node.start_mark,
                f"the key {key!r} is given twice (first on line {first[key] + 1})",
                key_node.start_mark)
        first[key] = key_node.start_mark.line
    return SafeConstructor.construct_mapping(loader, node, deep)  # (flattens the merge keys)


SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load(stream: str | bytes | IO[Any]) -> Any:
    """`yaml.safe_load`, with the C parser when available; a key given twice is an error."""
    return yaml.load(stream, Loader=SafeLoader)  # noqa: S506 - a safe loader


def compose(stream: str | bytes | IO[Any]) -> yaml.Node | None:
    """`yaml.compose` (the node tree, with line marks) under the safe loader."""
    return yaml.compose(stream, Loader=SafeLoader)
