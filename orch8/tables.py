"""Plain-text tables for the command line: aligned columns, a header, nothing fancy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson


def cell(value: Any) -> str:
    """How one value shows in a table: `-` for nothing, JSON for structures."""
    if value is None or value == "":
        return "-"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


def render(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """`rows` as a table of `columns`, upper-case headers, columns two spaces apart."""
    cells = [[cell(row.get(column)) for column in columns] for row in rows]
    header = [column.upper() for column in columns]
    widths = [max(len(line[index]) for line in [header, *cells]) for index in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
             for line in [header, *cells]]
    return "\n".join(line.rstrip() for line in lines)


def render_record(record: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """One object as `key: value` lines."""
    shown = list(keys) if keys is not None else list(record)
    width = max((len(key) for key in shown), default=0)
    return "\n".join(f"{key.ljust(width)}  {cell(record.get(key))}" for key in shown)
