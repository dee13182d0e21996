r"""How the commands print: one record a line (tab-separated, or one JSON object), bodies as text
or base64, and aligned tables for people.

The text forms escape what would break a line apart or reach the terminal as a command: a body
or attribute holding a tab or a newline cannot forge a field or a record, nor one holding ESC
set the terminal's title or clipboard. Backslash, tab, newline and carriage return print as
\\ \t \n \r; other control characters (C0, DEL, C1) as \xNN; line and paragraph separators
and the bidirectional overrides and isolates as \uNNNN. JSON is printed as it was (json escapes
the C0 control characters itself).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_CONTROLS = [*range(0x20), *range(0x7F, 0xA0)]
_FORMATS = [0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
ESCAPES = str.maketrans(
    {code: f"\\x{code:02x}" for code in _CONTROLS}
    | {code: f"\\u{code:04x}" for code in _FORMATS}
    | {ord(char): escaped for char, escaped in _NAMED.items()}
)


def escape(value: object) -> str:
    """str(value) safe to print on one line of a terminal (see above); the same when there is
    nothing to escape."""
    return str(value).translate(ESCAPES)


def data(body: bytes) -> dict[str, str]:
    """A body for printing: as text, or in base64 when it is not UTF-8."""
    try:
        return {"data": body.decode()}
    except UnicodeDecodeError:
        return {"data_base64": base64.b64encode(body).decode()}


def line(fields: Mapping[str, Any], *, as_json: bool) -> str:
    """One record: a JSON object, or its values escaped and separated by tabs."""
    if as_json:
        return json.dumps(fields, ensure_ascii=False)
    return "\t".join(escape(value) for value in fields.values())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with two spaces between them: the first to the left, numbers right."""
    cells = [list(headers), *([escape(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        first, *rest = row
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
