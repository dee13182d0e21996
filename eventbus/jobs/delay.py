"""Delayed messages in PostgreSQL, and the delay job that moves due ones to their queue or topic.

Due rows are claimed in batches (FOR UPDATE SKIP LOCKED plus a claim token), published with
confirms, then deleted under the same claim: two nodes never move the same row, and a node that
dies midway leaves rows whose claim expires and that another node moves (at least once).

Each row of a batch settles on its own: confirmed ones are deleted even when others failed (so
none is published twice); those RabbitMQ could not take now (away, the target missing, full or
refusing its declaration) wait a back-off of their own and stay listed with the reason; those
sent but not confirmed in time on a connection still open stay claimed, never sent twice, until
their confirmation resolves (eventbus.unconfirmed); those refused for what they are (by
RabbitMQ or its client library) are quarantined in place: kept with the reason, never claimed
again, listed by `eventbus delayed list`, cancellable, and put back by `eventbus delayed
release`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from ..backends.retry import describe
from ..backends.store import Store
from ..delivery.envelope import DelayedMessage, Envelope, Outgoing, no_attributes
from ..delivery.publisher import Outcome, Publisher, Target
from ..errors import Unavailable
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from . import ledger
from .ledger import attributes_from, attributes_json, columns, epoch
from .quarantine import printable
from .unconfirmed import Unconfirmed

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)

BATCH = 500

INSERT = """
INSERT INTO delayed_messages (id, kind, target, body, due_at, ttl_seconds, attributes, attempt,
                              published_at, message_id)
SELECT m.id, m.kind, m.target, m.body, to_timestamp(m.due_at), m.ttl, m.attributes, m.attempt,
       to_timestamp(m.published_at), m.message_id
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::float8[], $6::bigint[],
            $7::jsonb[], $8::int[], $9::float8[], $10::uuid[])
     AS m(id, kind, target, body, due_at, ttl, attributes, attempt, published_at, message_id)
ON CONFLICT (id) DO NOTHING
"""

# Rows that fell due within the last $4 seconds go first, so a backlog (a node was down) does
# not make messages late that fall due while it drains; the backlog fills the rest, oldest first.
CLAIM = """
WITH fresh AS (
    SELECT id FROM delayed_messages
    WHERE due_at <= now() AND due_at > now() - make_interval(secs => $4)
      AND (claimed_until IS NULL OR claimed_until < now()) AND quarantined_at IS NULL
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), backlog AS (
    SELECT id FROM delayed_messages
    WHERE due_at <= now() - make_interval(secs => $4)
      AND (claimed_until IS NULL OR claimed_until < now()) AND quarantined_at IS NULL
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE delayed_messages d
SET claim_token = $1, claimed_until = now() + make_interval(secs => $3)
WHERE d.id IN (SELECT id FROM fresh UNION ALL
               (SELECT id FROM backlog LIMIT greatest(0, $2 - (SELECT count(*) FROM fresh))))
RETURNING d.id, d.kind, d.target, d.body, extract(epoch FROM d.due_at) AS due_at, d.ttl_seconds,
    d.attributes, d.attempt, extract(epoch FROM d.published_at) AS published_at, d.message_id
"""

FORGET = "DELETE FROM delayed_messages WHERE id = ANY($2::uuid[]) AND claim_token = $1"
FREE = """
UPDATE delayed_messages SET claim_token = NULL, claimed_until = NULL
WHERE claim_token = ANY($1::uuid[])
"""
# Rows RabbitMQ could not take now wait BACK_OFF_MIN * 2^(failures so far), at most
# BACK_OFF_MAX seconds, before they are claimed again; the others of the job go on meanwhile.
BACK_OFF = """
UPDATE delayed_messages d
SET claim_token = NULL, publish_failures = d.publish_failures + 1, last_failure = w.reason,
    claimed_until = now() + make_interval(
        secs => least($4::float8, $3::float8 * 2 ^ least(d.publish_failures, 20)))
FROM unnest($2::uuid[], $5::text[]) AS w(id, reason)
WHERE d.id = w.id AND d.claim_token = $1
"""
BACK_OFF_MIN = 1.0
BACK_OFF_MAX = 30.0
RELEASE = """
UPDATE delayed_messages
SET quarantined_at = NULL, quarantine_reason = NULL, publish_failures = 0, claimed_until = NULL
WHERE quarantined_at IS NOT NULL AND ($1::uuid IS NULL OR id = $1::uuid)
"""
QUARANTINE = """
UPDATE delayed_messages d
SET claim_token = NULL, claimed_until = NULL, quarantined_at = now(), quarantine_reason = q.reason
FROM unnest($2::uuid[], $3::text[]) AS q(id, reason)
WHERE d.id = q.id AND d.claim_token = $1
"""
# Rows whose message may still be stored (sent, not yet confirmed): claimed anew, under token $2.
HOLD = """
UPDATE delayed_messages SET claim_token = $2, claimed_until = now() + make_interval(secs => $4)
WHERE claim_token = $1 AND id = ANY($3::uuid[])
"""
FORGET_CONFIRMED = FORGET + " RETURNING target"
GIVE_BACK_TIMEOUT = 2.0
# Seconds until the next row falls due, from the due_at index alone.
NEXT_DUE = """
SELECT extract(epoch FROM min(due_at) - now()) FROM delayed_messages WHERE due_at > now()
"""


async def write(store: Store, messages: Sequence[DelayedMessage]) -> list[tuple[str, str, int]]:
    """Store delayed messages (repeats are ignored); the bookkeeping writer's signature."""
    await store.execute(INSERT, *columns([_row(m) for m in messages], 10))
    return []


def _row(m: DelayedMessage) -> tuple[Any, ...]:
    """A delayed message as the 10 columns INSERT takes."""
    attributes = attributes_json(m.attributes)
    return (
        m.id,
        m.kind,
        m.target,
        m.body,
        m.due_at,
        m.ttl_seconds,
        attributes,
        m.attempt,
        m.published_at,
        m.message_id,
    )


@dataclass(frozen=True, slots=True)
class DueMessage:
    """A claimed delayed message, its body as PostgreSQL keeps it."""

    id: str
    kind: str
    target: str
    body: bytes
    due_at: float  # epoch seconds
    ttl_seconds: int
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    attempt: int = 1
    published_at: float | None = None  # None: when it reaches its queue
    message_id: str | None = None  # None: id

    def to_amqp(self, now: float) -> tuple[Target, Outgoing]:
        """Where it goes, and the message as it is published when due."""
        expires_at = now + self.ttl_seconds if self.ttl_seconds > 0 else None
        published_at = now if self.published_at is None else self.published_at
        message_id = self.message_id or self.id
        envelope = Envelope(
            message_id, self.body, self.attempt, expires_at, self.attributes, published_at
        )
        target: Target = ("topic", self.target) if self.kind == "topic" else ("queue", self.target)
        return target, envelope.to_amqp(now)


async def claim_due(
    store: Store, token: str, limit: int, claim_seconds: float, fresh_seconds: float
) -> list[DueMessage]:
    """Claim up to limit due delayed messages for claim_seconds: those due within the last
    fresh_seconds first, then the oldest. Quarantined ones are never claimed."""
    rows = await store.fetch(CLAIM, token, limit, claim_seconds, fresh_seconds)
    return [
        DueMessage(
            str(r["id"]),
            r["kind"],
            r["target"],
            r["body"],
            float(r["due_at"]),
            int(r["ttl_seconds"]),
            attributes_from(r["attributes"]),
            r["attempt"],
            epoch(r["published_at"]),
            str(r["message_id"]) if r["message_id"] is not None else None,
        )
        for r in rows
    ]


@dataclass(frozen=True)
class Claim:
    """A batch of due delayed messages this node holds under one token."""

    token: str
    messages: list[DueMessage]


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
        self._unconfirmed = Unconfirmed()

    async def tick(self) -> float | None:
        """Move every due delayed message, batch by batch. While one batch is published the
        next one is claimed, so the database round trips cost no publishing time. Returns in
        how many seconds the next delayed message falls due (None: there is none)."""
        claim = await self._claim(ledger.new_token())
        while claim.messages:
            claim = await self._move_claiming_next(claim)
            await self.settle_unconfirmed()  # a long tick renews their claims too
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
        """Publish and settle a claimed batch; meanwhile, when it was a full one, claim the
        next. Returns that next batch (empty when there is none). Raises Unavailable, once the
        batch is settled, when RabbitMQ could take none of it."""
        following = Claim(ledger.new_token(), [])
        claim_failure: Exception | None = None

        async def claim_following() -> None:
            nonlocal following, claim_failure
            try:
                following = await self._claim(following.token)
            except Exception as error:  # reported once this batch is through
                claim_failure = error

        confirmed: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                if len(claim.messages) == BATCH:
                    nursery.start_soon(claim_following)
                published_at, generation = time.time(), self._publisher.generation
                outcomes = await self._publisher.to_targets(self._messages(claim, published_at))
                confirmed = _ids(claim, outcomes, "confirmed")
                await self._settle(claim, outcomes, published_at, generation)
            _raise_unavailable(outcomes)
        except BaseException:
            # Confirmed rows are forgotten, so they go out once; the others are free again.
            await self._give_back(FORGET, claim.token, confirmed)
            await self._give_back(FREE, [claim.token, following.token])
            raise
        if claim_failure is not None:
            raise claim_failure
        return following

    def _messages(self, claim: Claim, now: float) -> list[tuple[Target, Outgoing]]:
        return [message.to_amqp(now) for message in claim.messages]

    async def _settle(
        self, claim: Claim, outcomes: list[Outcome], published_at: float, generation: int
    ) -> None:
        """Hold the rows that may yet be stored, forget the confirmed ones, quarantine the
        refused ones, back the rest off. The held ones first: should the rest fail, the batch's
        claim is freed, and they must no longer be part of it."""
        await self._hold_unconfirmed(claim, outcomes, generation)
        await self._store.execute(FORGET, claim.token, _ids(claim, outcomes, "confirmed"))
        refused = [
            (m, o) for m, o in zip(claim.messages, outcomes, strict=True) if o.status == "refused"
        ]
        if refused:
            reasons = [printable(o.reason) for _, o in refused]
            await self._store.execute(QUARANTINE, claim.token, [m.id for m, _ in refused], reasons)
            self._report(refused)
        await self._back_off(claim, outcomes)
        for message, outcome in zip(claim.messages, outcomes, strict=True):
            if outcome.status == "confirmed":
                self._metrics.delay_dispatched.labels(message.target).inc()
                self._metrics.delay_lateness.observe(max(0.0, published_at - message.due_at))
        logger.debug("delay: published %d in %.3f s", len(outcomes), time.time() - published_at)

    async def _back_off(self, claim: Claim, outcomes: list[Outcome]) -> None:
        """Rows RabbitMQ could not take now wait, each with its reason, then go again."""
        waiting = [
            (m.id, printable(o.reason))
            for m, o in zip(claim.messages, outcomes, strict=True)
            if o.status == "unavailable" and o.pending is None
        ]
        if waiting:
            ids, reasons = [i for i, _ in waiting], [r for _, r in waiting]
            await self._store.execute(
                BACK_OFF, claim.token, ids, BACK_OFF_MIN, BACK_OFF_MAX, reasons
            )

    async def _hold_unconfirmed(
        self, claim: Claim, outcomes: list[Outcome], generation: int
    ) -> None:
        """Keep the rows whose message may yet be stored claimed under a token of their own,
        so neither this batch's failure nor a later tick sends them again."""
        held = [
            (m, o.pending)
            for m, o in zip(claim.messages, outcomes, strict=True)
            if o.status == "unavailable" and o.pending is not None
        ]
        if not held:
            return
        token = ledger.new_token()
        ids = [m.id for m, _ in held]
        await self._store.execute(HOLD, claim.token, token, ids, self._claim_seconds)
        for message, confirmation in held:
            self._unconfirmed.add(token, message.id, confirmation, generation)
        ratelog.info(
            "delay unconfirmed",
            "delay: %d delayed message(s) sent but not confirmed yet; not sent again meanwhile",
            len(held),
        )

    async def settle_unconfirmed(self) -> None:
        """(Every interval, the lock held or not, and between batches.) Forget the held rows
        RabbitMQ confirmed meanwhile, back off those whose connection closed first (they go
        again), and keep holding the rest."""
        for resolved in self._unconfirmed.resolve(self._publisher.generation):
            token = resolved.token
            if resolved.confirmed:
                rows = await self._store.fetch(FORGET_CONFIRMED, token, resolved.confirmed)
                self._unconfirmed.forget(token, resolved.confirmed)
                for row in rows:
                    self._metrics.delay_dispatched.labels(row["target"]).inc()
            if resolved.failed:
                reasons = ["its confirm never came: the connection closed"] * len(resolved.failed)
                await self._store.execute(
                    BACK_OFF, token, resolved.failed, BACK_OFF_MIN, BACK_OFF_MAX, reasons
                )
                self._unconfirmed.forget(token, resolved.failed)
            if resolved.waiting:
                await self._store.execute(
                    HOLD, resolved.token, resolved.token, resolved.waiting, self._claim_seconds
                )

    def _report(self, refused: list[tuple[DueMessage, Outcome]]) -> None:
        for message, _ in refused:
            self._metrics.quarantined.labels(message.target).inc()
        message, outcome = refused[0]
        ratelog.error(
            "delay quarantine",
            "delay: %d delayed message(s) quarantined (see `eventbus delayed list "
            "--quarantined`), e.g. %s for %s %r: %s",
            len(refused),
            message.id,
            message.kind,
            message.target,
            outcome.reason,
        )

    async def _give_back(self, statement: str, *args: Any) -> None:
        """After a failure, settle claimed rows at once (statement: FREE or FORGET) rather than
        when their claim runs out; if even that fails, the claims still run out by
        themselves."""
        with trio.move_on_after(GIVE_BACK_TIMEOUT, shield=True):
            try:
                await self._store.execute(statement, *args)
            except Exception as error:
                logger.debug("delay: settling claims after a failure: %s", describe(error))


def _ids(claim: Claim, outcomes: list[Outcome], status: str) -> list[str]:
    return [m.id for m, o in zip(claim.messages, outcomes, strict=True) if o.status == status]


def _raise_unavailable(outcomes: list[Outcome]) -> None:
    """End the tick when RabbitMQ could take none of a batch: it is away, and would not take
    the next. Some of a batch waiting (a queue full or missing) stops nothing else."""
    if outcomes and all(o.status == "unavailable" for o in outcomes):
        raise Unavailable(f"{len(outcomes)} delayed message(s) wait: {outcomes[0].reason}")


@dataclass(frozen=True)
class Pending:
    id: str
    kind: str
    target: str
    body: bytes
    due_at: datetime
    quarantined_at: datetime | None
    quarantine_reason: str | None
    publish_failures: int
    last_failure: str | None


async def pending(
    store: Store,
    kind: str | None,
    target: str | None,
    limit: int,
    *,
    quarantined: bool = False,
    offset: int = 0,
) -> list[Pending]:
    """Delayed messages not yet moved, soonest first, from the offset-th on; optionally of one
    queue or topic, or only the quarantined ones."""
    clauses, args = ["quarantined_at IS NOT NULL"] if quarantined else [], []
    for column, value in (("kind", kind), ("target", target)):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} = ${len(args)}")
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    rows = await store.fetch(
        "SELECT id, kind, target, body, due_at, quarantined_at, quarantine_reason, "
        "publish_failures, last_failure "
        f"FROM delayed_messages{where} ORDER BY due_at, id "
        f"LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args,
        limit,
        offset,
    )
    return [
        Pending(
            str(r["id"]),
            r["kind"],
            r["target"],
            r["body"],
            r["due_at"],
            r["quarantined_at"],
            r["quarantine_reason"],
            r["publish_failures"],
            r["last_failure"],
        )
        for r in rows
    ]


async def release(store: Store, message_id: str | None) -> int:
    """Put quarantined delayed messages back (one, or all with None): they are claimed and
    published again at the next tick. Returns how many were released."""
    status: Any = await store.execute(RELEASE, message_id)
    return ledger.row_count(str(status))


async def cancel(store: Store, message_id: str) -> bool:
    """Forget a delayed message that has not been moved yet (quarantined or not); False when
    there is none."""
    return bool(await cancel_all(store, [message_id]))


async def cancel_all(store: Store, message_ids: Sequence[str]) -> set[str]:
    """Forget the named delayed messages that have not been moved yet (quarantined or not);
    returns the ids of those there were."""
    rows = await store.fetch(
        "DELETE FROM delayed_messages WHERE id = ANY($1::uuid[]) RETURNING id", list(message_ids)
    )
    return {str(row["id"]) for row in rows}
