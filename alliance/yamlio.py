"""YAML reading through libyaml's C parser when PyYAML was built with it.

The pure-Python parser took about a third of a second of every definitions load (contract,
instruments, model sidecars, suites) and of every ingest's set-up; the C parser reads the same
safe subset with the same marks (line numbers) in errors and on nodes.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load(stream: str | bytes | IO[Any]) -> Any:
    """`yaml.safe_load`, with the C parser when available."""
    return yaml.load(stream, Loader=SafeLoader)  # noqa: S506 - a safe loader


def compose(stream: str | bytes | IO[Any]) -> yaml.Node | None:
    """`yaml.compose` (the node tree, with line marks) under the safe loader."""
    return yaml.compose(stream, Loader=SafeLoader)
