"""Delayed messages in PostgreSQL, and the delay job that moves due ones to their queue or topic.

Due rows are claimed in batches (FOR UPDATE SKIP LOCKED plus a claim token), published with
confirms, then deleted under the same claim: two nodes never move the same row, and a node that
dies midway leaves rows whose claim expires and that another node moves (at least once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio

from . import ledger
from .envelope import DelayedMessage, Outgoing
from .ledger import columns
from .metrics import Metrics
from .publisher import Publisher, Target
from .retry import describe
from .store import Store

logger = logging.getLogger(__name__)

BATCH = 500

INSERT = """
INSERT INTO delayed_messages (id, kind, target, body, due_at, ttl_seconds)
SELECT m.id, m.kind, m.target, m.body, to_timestamp(m.due_at), m.ttl
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::bigint[])
     AS m(id, kind, target, body, due_at, ttl)
ON CONFLICT (id) DO NOTHING
"""

# Rows that fell due within the last $4 seconds go first, so a backlog (a node was down) does
# not make messages late that fall due while it drains; the backlog fills the rest, oldest first.
CLAIM = """
WITH fresh AS (
    SELECT id FROM delayed_messages
    WHERE due_at <= now() AND due_at > now() - make_interval(secs => $4)
      AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), backlog AS (
    SELECT id FROM delayed_messages
    WHERE due_at <= now() - make_interval(secs => $4)
      AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE delayed_messages d
SET claim_token = $1, claimed_until = now() + make_interval(secs => $3)
WHERE d.id IN (SELECT id FROM fresh UNION ALL
               (SELECT id FROM backlog LIMIT greatest(0, $2 - (SELECT count(*) FROM fresh))))
RETURNING d.id, d.kind, d.target, d.body, extract(epoch FROM d.due_at) AS due_at, d.ttl_seconds
"""

FORGET = "DELETE FROM delayed_messages WHERE id = ANY($2::uuid[]) AND claim_token = $1"
FREE = """
UPDATE delayed_messages SET claim_token = NULL, claimed_until = NULL
WHERE claim_token = ANY($1::uuid[])
"""
FORGET_CLAIMED = "DELETE FROM delayed_messages WHERE claim_token = ANY($1::uuid[])"
GIVE_BACK_TIMEOUT = 2.0
# Seconds until the next row falls due, from the due_at index alone.
NEXT_DUE = """
SELECT extract(epoch FROM min(due_at) - now()) FROM delayed_messages WHERE due_at > now()
"""


async def write(store: Store, messages: Sequence[DelayedMessage]) -> list[tuple[str, str, int]]:
    """Store delayed messages (repeats are ignored); the bookkeeping writer's signature."""
    rows = [(m.id, m.kind, m.target, m.body, m.due_at, m.ttl_seconds) for m in messages]
    await store.execute(INSERT, *columns(rows, 6))
    return []


async def claim_due(
    store: Store, token: str, limit: int, claim_seconds: float, fresh_seconds: float
) -> list[DelayedMessage]:
    """Claim up to limit due delayed messages for claim_seconds: those due within the last
    fresh_seconds first, then the oldest."""
    rows = await store.fetch(CLAIM, token, limit, claim_seconds, fresh_seconds)
    return [
        DelayedMessage(
            str(r["id"]),
            r["kind"],
            r["target"],
            r["body"],
            float(r["due_at"]),
            int(r["ttl_seconds"]),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class Claim:
    """A batch of due delayed messages this node holds under one token."""

    token: str
    messages: list[DelayedMessage]


class Dispatcher:
    """One node's delay job; several nodes may run it, row claims keep them apart."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        metrics: Metrics,
        claim_seconds: float,
        interval: float,
    ) -> None:
        self._claim_seconds = claim_seconds
        self._fresh_seconds = max(2.0, 3 * interval)
        self._store = store
        self._publisher = publisher
        self._metrics = metrics

    async def tick(self) -> float | None:
        """Move every due delayed message, batch by batch. While one batch is published the
        next one is claimed, so the database round trips cost no publishing time. Returns in
        how many seconds the next delayed message falls due (None: there is none)."""
        claim = await self._claim(ledger.new_token())
        while claim.messages:
            claim = await self._move_claiming_next(claim)
        next_due = await self._store.fetchval(NEXT_DUE)
        return None if next_due is None else float(next_due)

    async def _claim(self, token: str) -> Claim:
        """Claim the next batch under token. The token exists before the claim, so when the
        claim is cut short after PostgreSQL took it, its rows are given back all the same."""
        try:
            due = await claim_due(
                self._store, token, BATCH, self._claim_seconds, self._fresh_seconds
            )
        except BaseException:
            await self._give_back(FREE, [token])
            raise
        return Claim(token, due)

    async def _move_claiming_next(self, claim: Claim) -> Claim:
        """Publish and forget a claimed batch; meanwhile, when it was a full one, claim the
        next. Returns that next batch (empty when there is none)."""
        following = Claim(ledger.new_token(), [])
        claim_failure: Exception | None = None

        async def claim_following() -> None:
            nonlocal following, claim_failure
            try:
                following = await self._claim(following.token)
            except Exception as error:  # reported once this batch is through
                claim_failure = error

        published = False
        try:
            async with trio.open_nursery() as nursery:
                if len(claim.messages) == BATCH:
                    nursery.start_soon(claim_following)
                published_at = await self._publish(claim)
                published = True
                await self._forget(claim, published_at)
        except BaseException:
            # Published rows are forgotten, so they go out once; the others are free again.
            unpublished = [following.token]
            if published:
                await self._give_back(FORGET_CLAIMED, [claim.token])
            else:
                unpublished.append(claim.token)
            await self._give_back(FREE, unpublished)
            raise
        if claim_failure is not None:
            raise claim_failure
        return following

    async def _publish(self, claim: Claim) -> float:
        """Publish a claimed batch with confirms; returns when it started (epoch seconds)."""
        started = time.time()
        messages: list[tuple[Target, Outgoing]] = [
            ((m.kind, m.target), m.envelope(started).to_amqp(started)) for m in claim.messages
        ]
        await self._publisher.to_targets(messages)
        logger.debug("delay: published %d in %.3f s", len(messages), time.time() - started)
        return started

    async def _forget(self, claim: Claim, published_at: float) -> None:
        await self._store.execute(FORGET, claim.token, [m.id for m in claim.messages])
        for message in claim.messages:
            self._metrics.delay_dispatched.labels(message.target).inc()
            self._metrics.delay_lateness.observe(max(0.0, published_at - message.due_at))

    async def _give_back(self, statement: str, tokens: list[str]) -> None:
        """After a failure, settle claimed rows at once (statement: FREE or FORGET_CLAIMED)
        rather than when their claim runs out; if even that fails, the claims still run out
        by themselves."""
        with trio.move_on_after(GIVE_BACK_TIMEOUT, shield=True):
            try:
                await self._store.execute(statement, tokens)
            except Exception as error:
                logger.debug("delay: settling claims after a failure: %s", describe(error))


@dataclass(frozen=True)
class Pending:
    id: str
    kind: str
    target: str
    body: str
    due_at: datetime


async def pending(store: Store, kind: str | None, target: str | None, limit: int) -> list[Pending]:
    """Delayed messages not yet moved, soonest first; optionally of one queue or topic."""
    clauses, args = [], []
    for column, value in (("kind", kind), ("target", target)):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = await store.fetch(
        f"SELECT id, kind, target, body, due_at FROM delayed_messages{where} "
        f"ORDER BY due_at LIMIT ${len(args) + 1}",
        *args,
        limit,
    )
    return [Pending(str(r["id"]), r["kind"], r["target"], r["body"], r["due_at"]) for r in rows]


async def cancel(store: Store, message_id: str) -> bool:
    """Forget a delayed message that has not been moved yet; False when there is none."""
    status: Any = await store.execute(
        "DELETE FROM delayed_messages WHERE id = $1::uuid", message_id
    )
    return bool(status == "DELETE 1")
