"""Publish dedup for v2: a dedup_id already stored for the same queue or topic within
delivery.dedup_window_seconds is not stored again; the caller learns the first message's id.

The ids live in PostgreSQL, so they hold across nodes and restarts. A batch reserves its ids in
one statement before publishing and marks the confirmed ones stored in a second; those that
surely did not go (refused, or never sent) it releases. An id reserved by another call and not
yet stored is UNAVAILABLE (retry: by then it is stored, a duplicate, or released): concurrent
publishes of one id store it once. A reservation neither stored nor released within
RESERVATION_SECONDS (its call died, or its confirm never came) is taken over. Only a publish
that carries dedup ids waits on PostgreSQL; without it such a publish is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import trio

from ..backends import aio
from ..backends.pgerrors import OUTAGE
from ..backends.retry import describe
from ..backends.store import Queries
from ..errors import Unavailable
from .outbound import MAX_BATCH, Prepared
from .publisher import bulk_deadline

logger = logging.getLogger(__name__)

T = TypeVar("T")

FORGET_EVERY = 60.0  # seconds between deletions of expired ids
TIMEOUT = 5.0  # one statement; a silent PostgreSQL must not hold the call longer
RESERVATION_SECONDS = bulk_deadline(MAX_BATCH) + 10  # past any call's publishing deadline

RESERVE = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[]) AS i(scope, dedup_id, message_id)
), reserved AS (
    INSERT INTO dedup AS d (scope, dedup_id, message_id)
    SELECT scope, dedup_id, message_id FROM input
    ON CONFLICT (scope, dedup_id) DO UPDATE
        SET message_id = CASE WHEN d.stored THEN EXCLUDED.message_id ELSE d.message_id END,
            created_at = now(), stored = false
        WHERE d.created_at < now() - make_interval(secs => $4)
           OR (NOT d.stored AND d.created_at < now() - make_interval(secs => $5))
    RETURNING d.scope, d.dedup_id, d.message_id
)
SELECT i.scope, i.dedup_id, coalesce(r.message_id, d.message_id) AS message_id,
       r.message_id IS NULL AS duplicate, coalesce(d.stored, false) AS stored
FROM input i
LEFT JOIN reserved r USING (scope, dedup_id)
LEFT JOIN dedup d USING (scope, dedup_id)
"""

MARK_STORED = """
UPDATE dedup SET stored = true
FROM unnest($1::text[], $2::text[], $3::uuid[]) AS s(scope, dedup_id, message_id)
WHERE dedup.scope = s.scope AND dedup.dedup_id = s.dedup_id AND dedup.message_id = s.message_id
"""

RELEASE = """
DELETE FROM dedup
USING unnest($1::text[], $2::text[], $3::uuid[]) AS s(scope, dedup_id, message_id)
WHERE dedup.scope = s.scope AND dedup.dedup_id = s.dedup_id AND dedup.message_id = s.message_id
  AND NOT dedup.stored
"""

FORGET_EXPIRED = """
DELETE FROM dedup WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM dedup WHERE created_at < now() - make_interval(secs => $1) LIMIT $2))
"""


class Dedup:
    """Reserves and marks dedup ids (asyncio side)."""

    def __init__(self, queries: Queries, window_seconds: float) -> None:
        self._queries = queries
        self.window = window_seconds

    async def reserve(self, batch: Sequence[Prepared]) -> None:
        """Mark the messages of batch already stored as duplicates, with the first message's
        id; the others keep their new ids, reserved. A dedup id twice in one batch is stored
        once."""
        first: dict[tuple[str, str], Prepared] = {}
        for message in batch:
            if not message.dedup_id:
                continue
            earlier = first.setdefault((message.scope, message.dedup_id), message)
            if earlier is not message:
                message.duplicate, message.message_id = True, earlier.message_id
        if first:
            await self._reserve(list(first.values()), batch)

    async def _reserve(self, unique: list[Prepared], batch: Sequence[Prepared]) -> None:
        rows = await _bounded(
            "reserving dedup ids",
            self._queries.fetch(RESERVE, *_keys(unique), self.window, RESERVATION_SECONDS),
        )
        found = {(r["scope"], r["dedup_id"]): r for r in rows}
        # None: another call reserved the id after this statement's snapshot; a duplicate not
        # stored: another call is publishing it now. Either way its outcome is not known yet.
        if any(r["message_id"] is None or (r["duplicate"] and not r["stored"]) for r in rows):
            raise Unavailable("a dedup_id of this batch is being stored by another call; retry")
        for message in batch:
            row = found.get((message.scope, message.dedup_id))
            if row is not None:
                message.message_id = str(row["message_id"])
                message.duplicate = message.duplicate or row["duplicate"]

    async def mark_stored(self, stored: Sequence[Prepared]) -> None:
        """Record that these messages were confirmed; a failure is logged (their ids then stay
        reserved, and a retry with the same dedup id publishes again, at least once)."""
        unique = [m for m in stored if m.dedup_id and not m.duplicate]
        if not unique:
            return
        try:
            await _bounded(
                "marking dedup ids stored", self._queries.execute(MARK_STORED, *_keys(unique))
            )
        except Unavailable as error:
            logger.warning("dedup: %s", error.message)

    async def release(self, unsent: Sequence[Prepared]) -> None:
        """Give up the reservations of messages that surely were not stored, so a retry
        publishes at once; a failure is logged (they are taken over after RESERVATION_SECONDS)."""
        unique = [m for m in unsent if m.dedup_id and not m.duplicate]
        if not unique:
            return
        try:
            await _bounded("releasing dedup ids", self._queries.execute(RELEASE, *_keys(unique)))
        except Unavailable as error:
            logger.warning("dedup: %s", error.message)

    async def forget_expired(self, limit: int = 10_000) -> int:
        """Delete up to limit ids older than the window; returns how many."""
        work = self._queries.execute(FORGET_EXPIRED, self.window, limit)
        status = await _bounded("forgetting expired dedup ids", work)
        return int(status.split()[-1])


def _keys(messages: Sequence[Prepared]) -> tuple[list[str], list[str], list[str]]:
    return (
        [m.scope for m in messages],
        [m.dedup_id for m in messages],
        [m.message_id for m in messages],
    )


async def _bounded(what: str, work: Awaitable[T]) -> T:
    """work's result within TIMEOUT; Unavailable naming what failed otherwise (a broken
    pooled connection too: see pgerrors)."""
    try:
        async with asyncio.timeout(TIMEOUT):
            return await work
    except OUTAGE as error:
        raise Unavailable(
            f"{what} in PostgreSQL failed: {describe(error)} (dedup_id needs PostgreSQL)"
        ) from None


async def forget_expired_forever(dedup: Dedup, every: float = FORGET_EVERY) -> None:
    """(trio side) Delete expired dedup ids every so often, until cancelled; PostgreSQL being
    away only postpones it."""
    while True:
        try:
            forgotten = await aio.call(dedup.forget_expired)
        except Unavailable as error:
            logger.info("dedup: %s", error.message)
        else:
            if forgotten:
                logger.debug("dedup: forgot %d expired ids", forgotten)
        await trio.sleep(every)
