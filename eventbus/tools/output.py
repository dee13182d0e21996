"""How the commands print: one record a line (tab-separated, or one JSON object), bodies as text
or base64, and aligned tables for people."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any


def data(body: bytes) -> dict[str, str]:
    """A body for printing: as text, or in base64 when it is not UTF-8."""
    try:
        return {"data": body.decode()}
    except UnicodeDecodeError:
        return {"data_base64": base64.b64encode(body).decode()}


def line(fields: Mapping[str, Any], *, as_json: bool) -> str:
    """One record: a JSON object, or its values separated by tabs."""
    if as_json:
        return json.dumps(fields, ensure_ascii=False)
    return "\t".join(str(value) for value in fields.values())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with two spaces between them: the first to the left, numbers right."""
    cells = [list(headers), *([str(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        first, *rest = row
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
