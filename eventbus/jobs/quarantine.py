"""Messages set aside: what PostgreSQL refused to store, or could not be read, kept as it came.

A message on an internal queue that PostgreSQL refuses (a value out of range, say) or that cannot
be decoded would otherwise fail its whole batch again and again, or be dropped. It goes to the
`quarantine` table instead, with the queue it came from, its raw bytes and the reason, for an
operator to look at; the rest of its batch is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from ..backends.store import Store

logger = logging.getLogger(__name__)

INSERT = """
INSERT INTO quarantine (source, body, reason)
SELECT $1, q.body, q.reason FROM unnest($2::bytea[], $3::text[]) AS q(body, reason)
"""


@dataclass(frozen=True)
class Quarantined:
    id: int
    source: str
    body: bytes
    reason: str
    quarantined_at: datetime


def printable(reason: str) -> str:
    """A reason PostgreSQL can store as text (no NUL character)."""
    return reason.replace("\x00", "\\x00")


async def keep(store: Store, source: str, bad: Sequence[tuple[bytes, str]]) -> None:
    """Set aside raw messages of source, each with why; waits on the database."""
    if bad:
        await store.execute(
            INSERT, source, [body for body, _ in bad], [printable(why) for _, why in bad]
        )


async def listed(store: Store, source: str | None, limit: int) -> list[Quarantined]:
    """Quarantined messages, oldest first; optionally of one source queue."""
    where, args = ("WHERE source = $2", [source]) if source is not None else ("", [])
    rows = await store.fetch(
        f"SELECT id, source, body, reason, quarantined_at FROM quarantine {where} "
        "ORDER BY id LIMIT $1",
        limit,
        *args,
    )
    return [
        Quarantined(r["id"], r["source"], r["body"], r["reason"], r["quarantined_at"]) for r in rows
    ]
