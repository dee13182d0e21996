"""The admin page's listings of dead letters and delayed messages: the rows a page shows, with
only the start of each body (HEAD_BYTES) and its full size, so a page of 50 large messages reads
kilobytes from PostgreSQL, not the messages themselves. The same rows and order as
jobs.admin.list_dead_letters and list_delayed (the CLI and Admin service listings)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..backends.store import Store

HEAD_BYTES = 1024  # of each body: enough for a preview of 120 characters

DEAD_LETTERS = f"""
SELECT message_id, substring(body FROM 1 FOR {HEAD_BYTES}) AS head, octet_length(body) AS size,
       attempts, last_failure_at, reason
FROM dead_letters WHERE queue = $1 ORDER BY dead_at, queue, message_id LIMIT $2 OFFSET $3
"""
DELAYED = f"""
SELECT id, substring(body FROM 1 FOR {HEAD_BYTES}) AS head, octet_length(body) AS size, due_at,
       quarantined_at, quarantine_reason
FROM delayed_messages WHERE kind = $1 AND target = $2 ORDER BY due_at, id LIMIT $3 OFFSET $4
"""


@dataclass(frozen=True)
class Letter:
    """A dead letter as its page lists it."""

    message_id: str
    head: bytes  # the body's first HEAD_BYTES
    size: int  # the body's length in bytes
    attempts: int
    last_failure_at: datetime
    reason: str | None  # None: it failed max_retries + 1 deliveries


@dataclass(frozen=True)
class Delayed:
    """A delayed message not moved yet, as its page lists it."""

    id: str
    head: bytes
    size: int
    due_at: datetime
    quarantined_at: datetime | None
    quarantine_reason: str | None


async def dead_letters(store: Store, queue: str, limit: int, offset: int) -> list[Letter]:
    """A queue's dead letters in the order they died, from the offset-th on."""
    rows = await store.fetch(DEAD_LETTERS, queue, limit, offset)
    return [
        Letter(
            str(r["message_id"]),
            bytes(r["head"]),
            r["size"],
            r["attempts"],
            r["last_failure_at"],
            r["reason"],
        )
        for r in rows
    ]


async def delayed(store: Store, owner: tuple[str, str], limit: int, offset: int) -> list[Delayed]:
    """The delayed messages of a queue or topic (owner: kind and name), soonest first, from
    the offset-th on."""
    kind, name = owner
    rows = await store.fetch(DELAYED, kind, name, limit, offset)
    return [
        Delayed(
            str(r["id"]),
            bytes(r["head"]),
            r["size"],
            r["due_at"],
            r["quarantined_at"],
            r["quarantine_reason"],
        )
        for r in rows
    ]
