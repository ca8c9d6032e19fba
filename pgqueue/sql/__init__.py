"""Loads the named queries in this folder's ``.sql`` files, once, at import.

A query starts at a ``-- name: query_name`` line; the comment lines after it say what it
does and what it checks. Duplicate names fail loudly. Only ``pgqueue.store`` imports this.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType
from typing import LiteralString, cast

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")


def parse(text: str, source: str) -> dict[str, str]:
    """Split one file's text into ``{name: sql}``; raise ``ValueError`` on duplicates."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is None:
            return
        body = "\n".join(lines).strip()
        if not body:
            raise ValueError(f"{source}: query {name!r} is empty")
        queries[name] = body

    for line in text.splitlines():
        match = _NAME.match(line)
        if match:
            flush()
            name = match.group(1)
            if name in queries:
                raise ValueError(f"{source}: query {name!r} defined twice")
            lines = []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


def _load() -> Mapping[str, LiteralString]:
    found: dict[str, LiteralString] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, body in parse(entry.read_text(encoding="utf-8"), entry.name).items():
            if name in found:
                raise ValueError(f"{entry.name}: query {name!r} is also defined elsewhere")
            # The text comes from files shipped in this package, never from input.
            found[name] = cast(LiteralString, body)  # type: ignore[redundant-cast]
    return MappingProxyType(found)


QUERIES: Mapping[str, LiteralString] = _load()
