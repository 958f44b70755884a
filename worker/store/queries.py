"""Loads the named SQL blocks of `queries.sql`."""

from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"^-- name: (\w+)\n(.*?)(?=^-- name: |\Z)", re.MULTILINE | re.DOTALL)


def _load(path: Path) -> dict[str, str]:
    blocks = {name: body.strip() for name, body in _BLOCK.findall(path.read_text())}
    assert blocks, f"no named SQL blocks in {path}"
    return blocks


QUERIES = _load(Path(__file__).with_name("queries.sql"))
