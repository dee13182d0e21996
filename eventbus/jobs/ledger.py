"""The delivery ledger in PostgreSQL: the SQL behind bookkeeping, republishing and dead letters.

Every function takes the Store and plain data, and returns plain data.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import trio

from ..backends.store import Queries, Store
from ..delivery.envelope import (
    NO_ATTRIBUTES,
    DeadlineChange,
    DeliveryRecord,
    Settlement,
    no_attributes,
)
from ..delivery.policy import Cause
from .quarantine import printable

FINISH_TIMEOUT = 10.0  # recording a batch's fate, connection included: a silent PostgreSQL
CLEAN_BUDGET = 10.0  # seconds one clean may take

RECORDS = """
unnest($1::uuid[], $2::uuid[], $3::text[], $4::bytea[], $5::int[], $6::float8[], $7::float8[],
       $8::float8[], $9::jsonb[], $10::float8[], $11::text[])
AS r(id, message_id, queue, body, attempt, delivered_at, deadline, expires_at, attributes,
     published_at, dead_reason)
"""
RECORD_COLUMNS = """
deliveries (id, message_id, queue, body, attempt, delivered_at, deadline, expires_at, attributes,
            published_at, done, outcome)
SELECT r.id, r.message_id, r.queue, r.body, r.attempt, to_timestamp(r.delivered_at),
       to_timestamp(r.deadline), to_timestamp(r.expires_at), r.attributes,
       to_timestamp(r.published_at)"""
INSERT_RECORDS = f"""
INSERT INTO {RECORD_COLUMNS}, false, NULL
FROM {RECORDS}
ON CONFLICT (id) DO NOTHING
"""
# Records of messages dead-lettered when they were to be handed out: their delivery done as
# dead, and a dead letter, once only (a record that comes again finds its delivery done).
INSERT_DEAD_RECORDS = f"""
WITH r AS (SELECT * FROM {RECORDS}), dead AS (
    INSERT INTO {RECORD_COLUMNS}, true, 'dead'
    FROM r
    ON CONFLICT (id) DO UPDATE
        SET done = true, outcome = 'dead', claim_token = NULL, claimed_until = NULL
        WHERE NOT deliveries.done
    RETURNING id
)
INSERT INTO dead_letters (queue, message_id, body, attempts, last_delivery_id, last_failure_at,
                          reason, attributes, published_at)
SELECT r.queue, r.message_id, r.body, r.attempt, r.id, to_timestamp(r.delivered_at),
       r.dead_reason, r.attributes, to_timestamp(r.published_at)
FROM r WHERE r.id IN (SELECT id FROM dead)
ON CONFLICT (queue, message_id) DO UPDATE
    SET body = EXCLUDED.body, attempts = EXCLUDED.attempts,
        last_delivery_id = EXCLUDED.last_delivery_id,
        last_failure_at = EXCLUDED.last_failure_at, dead_at = now(), reason = EXCLUDED.reason,
        attributes = EXCLUDED.attributes, published_at = EXCLUDED.published_at
"""

# An ack overrides an earlier nack of the same delivery (and is counted anew); anything else
# keeps the first word.
INSERT_SETTLEMENTS = """
INSERT INTO settlements (delivery_id, outcome, settled_at)
SELECT s.id, s.outcome, to_timestamp(s.at)
FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS s(id, outcome, at)
ON CONFLICT (delivery_id) DO UPDATE
    SET outcome = EXCLUDED.outcome, settled_at = EXCLUDED.settled_at, counted = false
    WHERE settlements.outcome = 'nack' AND EXCLUDED.outcome = 'ack'
"""

# Run by both writers once their rows are committed, so whichever of a delivery's record and
# settlement is stored second sees both; the row lock on the settlement makes one of two
# concurrent runs count it, the other skip it.
COUNT_SETTLED = """
WITH counted AS (
    UPDATE settlements s SET counted = true
    FROM deliveries d
    WHERE s.delivery_id = d.id AND s.delivery_id = ANY($1::uuid[]) AND NOT s.counted
      AND s.outcome IN ('ack', 'nack')
    RETURNING d.queue, s.outcome
)
SELECT queue, outcome, count(*) AS settled FROM counted GROUP BY queue, outcome
"""

# Settlements are applied in the order they were published; how far that has come only grows.
ADVANCE = """
INSERT INTO ledger_progress (name, applied_through) VALUES ($1, to_timestamp($2))
ON CONFLICT (name) DO UPDATE
    SET applied_through = greatest(ledger_progress.applied_through, EXCLUDED.applied_through)
"""
SETTLEMENTS_PROGRESS = "settlements"
# How far the nodes' clocks may differ: a deadline is acted on only once the settlements
# published this long after it are applied.
CLOCK_SKEW = 1.0


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows turned into width column lists, the shape unnest() takes."""
    return [[row[i] for row in rows] for i in range(width)]


def attributes_json(attributes: Mapping[str, str]) -> str | None:
    """Attributes as PostgreSQL keeps them: a JSON object, NULL when there are none."""
    return json.dumps(dict(attributes), separators=(",", ":")) if attributes else None


def attributes_from(stored: str | None) -> Mapping[str, str]:
    """Attributes as attributes_json stored them (jsonb reads as text)."""
    return json.loads(stored) if stored else NO_ATTRIBUTES


def epoch(value: Any) -> float | None:
    """An `extract(epoch FROM ...)` result (a Decimal, or NULL) as epoch seconds."""
    return None if value is None else float(value)


def settled_counts(rows: Sequence[Any]) -> list[tuple[str, str, int]]:
    return [(row["queue"], row["outcome"], row["settled"]) for row in rows]


async def write_records(
    store: Queries, records: Sequence[DeliveryRecord]
) -> list[tuple[str, str, int]]:
    """Insert delivery records (repeats are ignored), and keep those with a dead_reason as dead
    letters; returns (queue, outcome, count) of the settlements this made countable, taken once
    each."""
    handed_out = [_record_row(r) for r in records if r.dead_reason is None]
    dead = [_record_row(r) for r in one_record_per_message(records)]
    if handed_out:
        await store.execute(INSERT_RECORDS, *columns(handed_out, 11))
    if dead:
        await store.execute(INSERT_DEAD_RECORDS, *columns(dead, 11))
    ids = [r.id for r in records]
    await store.execute(APPLY_DEADLINES, ids)  # a change stored before its record
    return settled_counts(await store.fetch(COUNT_SETTLED, ids))


def _record_row(r: DeliveryRecord) -> tuple[Any, ...]:
    """A record as the 11 columns of RECORDS."""
    return (
        r.id,
        r.message_id,
        r.queue,
        r.body,
        r.attempt,
        r.delivered_at,
        r.deadline,
        r.expires_at,
        attributes_json(r.attributes),
        r.published_at,
        _printable(r.dead_reason),
    )


def one_record_per_message(records: Sequence[DeliveryRecord]) -> list[DeliveryRecord]:
    """The records to dead-letter, one per (queue, message id), that of the highest attempt: one
    statement may not insert and then update the same dead letter."""
    last: dict[tuple[str, str], DeliveryRecord] = {}
    for record in records:
        key = (record.queue, record.message_id)
        if record.dead_reason is not None and (
            key not in last or record.attempt > last[key].attempt
        ):
            last[key] = record
    return list(last.values())


async def write_settlements(
    store: Queries, settlements: Sequence[Settlement]
) -> list[tuple[str, str, int]]:
    """Record acks and nacks (and hand-outs returned), and apply deadline changes; returns
    (queue, outcome, count) of the acks and nacks whose record is known, taken once each."""
    changes = [s for s in settlements if isinstance(s, DeadlineChange)]
    if changes:
        await change_deadlines(store, changes)
    unique = merge_settlements([s for s in settlements if not isinstance(s, DeadlineChange)])
    if not unique:
        return []
    rows = [(s.delivery_id, s.outcome, s.at) for s in unique]
    ids, outcomes, times = columns(rows, 3)
    await store.execute(INSERT_SETTLEMENTS, ids, outcomes, times)
    return settled_counts(await store.fetch(COUNT_SETTLED, ids))


async def advance(store: Store, name: str, applied_through: float) -> None:
    """Record that every message of an in-order internal queue published up to
    applied_through has been applied."""
    await store.execute(ADVANCE, name, applied_through)


# A deadline change is kept, the one asked for last winning, then applied to its delivery while
# that is open. Its record may be stored after it (they travel through different queues): both
# writers apply the kept changes of their deliveries once their own rows are committed, so
# whichever of the two is stored second sees both.
KEEP_DEADLINES = """
INSERT INTO deadline_changes (delivery_id, deadline, asked_at)
SELECT c.id, to_timestamp(c.deadline), to_timestamp(c.at)
FROM unnest($1::uuid[], $2::float8[], $3::float8[]) AS c(id, deadline, at)
ON CONFLICT (delivery_id) DO UPDATE
    SET deadline = EXCLUDED.deadline, asked_at = EXCLUDED.asked_at
    WHERE deadline_changes.asked_at <= EXCLUDED.asked_at
"""
APPLY_DEADLINES = """
UPDATE deliveries d SET deadline = c.deadline
FROM deadline_changes c
WHERE c.delivery_id = ANY($1::uuid[]) AND d.id = c.delivery_id AND NOT d.done
  AND d.deadline <> c.deadline
"""


async def change_deadlines(store: Queries, changes: Sequence[DeadlineChange]) -> None:
    """Keep deadline changes and move the deadlines of their open deliveries."""
    latest: dict[str, DeadlineChange] = {}
    for change in changes:
        earlier = latest.get(change.delivery_id)
        if earlier is None or change.at >= earlier.at:
            latest[change.delivery_id] = change
    rows = [(c.delivery_id, c.deadline, c.at) for c in latest.values()]
    await store.execute(KEEP_DEADLINES, *columns(rows, 3))
    await store.execute(APPLY_DEADLINES, list(latest))


# Deliveries whose ids are no longer current: done (retried, dead, expired), or nacked.
STALE = """
SELECT i.id FROM unnest($1::uuid[]) AS i(id)
WHERE EXISTS (SELECT 1 FROM deliveries d WHERE d.id = i.id AND d.done)
   OR EXISTS (SELECT 1 FROM settlements s WHERE s.delivery_id = i.id AND s.outcome = 'nack')
"""
STALE_TIMEOUT = 0.5  # seconds a call waits to learn which of its ids are stale


async def stale(store: Queries, ids: Sequence[str]) -> set[str]:
    """Of these delivery ids (canonical UUIDs), those PostgreSQL knows to be no longer current:
    their delivery is done, or was nacked. One query."""
    return {str(row["id"]) for row in await store.fetch(STALE, list(ids))}


OPEN_DELIVERY = """
SELECT d.message_id, d.queue, d.body, d.attempt, d.attributes,
       extract(epoch FROM d.published_at) AS published_at,
       extract(epoch FROM d.expires_at) AS expires_at
FROM deliveries d
WHERE d.id = $1 AND NOT d.done
  AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.delivery_id = d.id)
"""


async def open_delivery(store: Queries, delivery_id: str, now: float) -> DeliveryRecord | None:
    """The record of a delivery still open (not done, not settled), as it was handed out but
    due now; None when PostgreSQL holds no such delivery."""
    rows = await store.fetch(OPEN_DELIVERY, delivery_id)
    if not rows:
        return None
    row = rows[0]
    return DeliveryRecord(
        id=delivery_id,
        message_id=str(row["message_id"]),
        queue=row["queue"],
        body=row["body"],
        attempt=row["attempt"],
        delivered_at=now,
        deadline=now,
        expires_at=epoch(row["expires_at"]),
        attributes=attributes_from(row["attributes"]),
        published_at=epoch(row["published_at"]),
    )


def merge_settlements(settlements: Sequence[Settlement]) -> list[Settlement]:
    """One settlement per delivery: an ack wins over a nack, else the first one stands."""
    merged: dict[str, Settlement] = {}
    for settlement in settlements:
        earlier = merged.get(settlement.delivery_id)
        if earlier is None or (earlier.outcome == "nack" and settlement.outcome == "ack"):
            merged[settlement.delivery_id] = settlement
    return list(merged.values())


@dataclass(frozen=True)
class DueDelivery:
    """A delivery the republish cron must act on."""

    id: str
    message_id: str
    queue: str
    body: bytes
    attempt: int
    expires_at: float | None
    failed_at: datetime
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    published_at: float | None = None
    cause: Cause = "deadline"  # nack: failed_at is when it was nacked; else its deadline


CLAIM_DUE = """
WITH applied AS (
    SELECT coalesce(max(applied_through), '-infinity') - make_interval(secs => $5) AS through
    FROM ledger_progress WHERE name = $6
), timed_out AS (
    SELECT d.id FROM deliveries d
    WHERE NOT d.done AND d.deadline <= least(now(), (SELECT through FROM applied))
      AND (d.claimed_until IS NULL OR d.claimed_until < now())
      AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.delivery_id = d.id)
    ORDER BY d.deadline
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
), nacked AS (
    SELECT d.id FROM settlements s JOIN deliveries d ON d.id = s.delivery_id
    WHERE s.outcome = 'nack' AND s.settled_at <= now() - make_interval(secs => $3)
      AND NOT d.done AND (d.claimed_until IS NULL OR d.claimed_until < now())
    ORDER BY s.settled_at
    LIMIT $2
    FOR UPDATE OF d SKIP LOCKED
)
UPDATE deliveries d
SET claim_token = $1, claimed_until = now() + make_interval(secs => $4)
WHERE d.id IN (SELECT id FROM timed_out UNION ALL SELECT id FROM nacked)
RETURNING d.id, d.message_id, d.queue, d.body, d.attempt, extract(epoch FROM d.expires_at) AS
    expires_at, coalesce((SELECT s.settled_at FROM settlements s WHERE s.delivery_id = d.id),
    d.deadline) AS failed_at, d.attributes, extract(epoch FROM d.published_at) AS published_at,
    CASE WHEN (SELECT s.outcome FROM settlements s WHERE s.delivery_id = d.id) = 'nack'
         THEN 'nack' ELSE 'deadline' END AS cause
"""


async def claim_due(
    store: Store, token: str, limit: int, nack_floor: float, claim_seconds: float
) -> list[DueDelivery]:
    """Claim up to limit deliveries for this token, so no other node acts on them: those nacked
    at least nack_floor seconds ago (the shortest wait any retry policy gives a nack), and those
    past their deadline. A missed deadline counts only once the settlements published up to
    CLOCK_SKEW after it have been applied: an ack that answered OK before the deadline is then
    in the table. Rows put back until later (postpone) are left alone until then."""
    rows = await store.fetch(
        CLAIM_DUE, token, limit, nack_floor, claim_seconds, CLOCK_SKEW, SETTLEMENTS_PROGRESS
    )
    return [
        DueDelivery(
            str(r["id"]),
            str(r["message_id"]),
            r["queue"],
            r["body"],
            r["attempt"],
            float(r["expires_at"]) if r["expires_at"] is not None else None,
            r["failed_at"],
            attributes_from(r["attributes"]),
            epoch(r["published_at"]),
            r["cause"],
        )
        for r in rows
    ]


FINISH = """
UPDATE deliveries SET done = true, outcome = r.outcome, claim_token = NULL, claimed_until = NULL
FROM unnest($2::uuid[], $3::text[]) AS r(id, outcome)
WHERE deliveries.id = r.id AND deliveries.claim_token = $1
"""

BURY = """
INSERT INTO dead_letters (queue, message_id, body, attempts, last_delivery_id, last_failure_at,
                          reason, attributes, published_at)
SELECT b.queue, b.message_id, b.body, b.attempts, b.last_delivery_id, b.last_failure_at,
       b.reason, b.attributes, to_timestamp(b.published_at)
FROM unnest($1::text[], $2::uuid[], $3::bytea[], $4::int[], $5::uuid[], $6::timestamptz[],
            $7::text[], $8::jsonb[], $9::float8[])
     AS b(queue, message_id, body, attempts, last_delivery_id, last_failure_at, reason,
          attributes, published_at)
ON CONFLICT (queue, message_id) DO UPDATE
    SET body = EXCLUDED.body, attempts = EXCLUDED.attempts,
        last_delivery_id = EXCLUDED.last_delivery_id,
        last_failure_at = EXCLUDED.last_failure_at, dead_at = now(), reason = EXCLUDED.reason,
        attributes = EXCLUDED.attributes, published_at = EXCLUDED.published_at
"""

# Claimed deliveries whose retry RabbitMQ could not take now (its queue full, say): due again
# after RETRY_BACK_OFF seconds, so they neither hold up the rest nor come first every tick.
RELEASE = """
UPDATE deliveries SET claim_token = NULL, claimed_until = now() + make_interval(secs => $3)
WHERE id = ANY($2::uuid[]) AND claim_token = $1
"""
RETRY_BACK_OFF = 10.0

# Retries confirmed after their tick (RabbitMQ blocked publishers meanwhile): done, as retried.
FINISH_RETRIED = """
UPDATE deliveries SET done = true, outcome = 'retried', claim_token = NULL, claimed_until = NULL
WHERE id = ANY($2::uuid[]) AND claim_token = $1
RETURNING queue
"""
# Retries still waiting for their confirm: claimed for another claim_seconds.
HOLD = """
UPDATE deliveries SET claimed_until = now() + make_interval(secs => $3)
WHERE id = ANY($2::uuid[]) AND claim_token = $1
"""


# Claimed deliveries that are not due yet under their queue's retry policy: back unclaimed, and
# left alone until they are due.
POSTPONE = """
UPDATE deliveries SET claim_token = NULL, claimed_until = to_timestamp(p.due_at)
FROM unnest($2::uuid[], $3::float8[]) AS p(id, due_at)
WHERE deliveries.id = p.id AND deliveries.claim_token = $1
"""


async def postpone(store: Store, token: str, due_at: Mapping[str, float]) -> None:
    """Give claimed deliveries back unchanged, not to be claimed again before their due time
    (epoch seconds, by id). Waits on PostgreSQL for at most FINISH_TIMEOUT (trio.TooSlowError)."""
    with trio.fail_after(FINISH_TIMEOUT):
        await store.execute(POSTPONE, token, list(due_at), list(due_at.values()))


async def finish_retried(store: Store, token: str, ids: Sequence[str]) -> list[str]:
    """Mark claimed deliveries done as retried; returns the queue of each."""
    return [row["queue"] for row in await store.fetch(FINISH_RETRIED, token, list(ids))]


async def hold(store: Store, token: str, ids: Sequence[str], seconds: float) -> None:
    """Keep claimed deliveries claimed for seconds more."""
    await store.execute(HOLD, token, list(ids), seconds)


async def release(store: Store, token: str, ids: Sequence[str]) -> None:
    """Give claimed deliveries back, due again after RETRY_BACK_OFF seconds."""
    await store.execute(RELEASE, token, list(ids), RETRY_BACK_OFF)


async def finish(
    store: Store,
    token: str,
    outcomes: dict[str, str],
    dead: Sequence[tuple[DueDelivery, str | None]],
    released: Sequence[str] = (),
) -> None:
    """Mark claimed deliveries done with their outcome, keep the dead ones as dead letters (each
    with its reason, None for the usual one), and give the released ones back unchanged, due
    again after RETRY_BACK_OFF seconds.

    Only rows still claimed by token change: a claim that expired meanwhile was taken over.
    Waits on PostgreSQL for at most FINISH_TIMEOUT (trio.TooSlowError).
    """
    letters = [_letter(d, why) for d, why in one_per_message(dead)]
    dead_columns = columns(letters, 9)

    async def work(connection: Any) -> None:
        await connection.execute(FINISH, token, list(outcomes), list(outcomes.values()))
        if dead:
            await connection.execute(BURY, *dead_columns)
        if released:
            await connection.execute(RELEASE, token, list(released), RETRY_BACK_OFF)

    with trio.fail_after(FINISH_TIMEOUT):
        await store.transaction(work)


def one_per_message(
    dead: Sequence[tuple[DueDelivery, str | None]],
) -> list[tuple[DueDelivery, str | None]]:
    """One dead letter per (queue, message id), that of the highest attempt: one statement may
    not insert and then update the same dead letter."""
    last: dict[tuple[str, str], tuple[DueDelivery, str | None]] = {}
    for delivery, why in dead:
        key = (delivery.queue, delivery.message_id)
        if key not in last or delivery.attempt > last[key][0].attempt:
            last[key] = (delivery, why)
    return list(last.values())


def _letter(d: DueDelivery, why: str | None) -> tuple[Any, ...]:
    """A dead delivery as the 9 columns BURY takes."""
    attributes = attributes_json(d.attributes)
    return (
        d.queue,
        d.message_id,
        d.body,
        d.attempt,
        d.id,
        d.failed_at,
        _printable(why),
        attributes,
        d.published_at,
    )


def _printable(why: str | None) -> str | None:
    return None if why is None else printable(why)


CLEAN_ACKED = """
WITH pairs AS (
    SELECT d.id FROM deliveries d JOIN settlements s ON s.delivery_id = d.id
    WHERE s.outcome IN ('ack', 'returned') LIMIT $1
), gone AS (
    DELETE FROM deliveries WHERE id IN (SELECT id FROM pairs) RETURNING id
)
DELETE FROM settlements WHERE delivery_id IN (SELECT id FROM gone)
"""

# Settlements whose delivery is gone (cleaned after it was done) or never came.
CLEAN_ORPHANS = """
DELETE FROM settlements WHERE delivery_id IN (
    SELECT s.delivery_id FROM settlements s
    WHERE s.settled_at < now() - make_interval(secs => $2)
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = s.delivery_id)
    LIMIT $1)
"""

CLEAN_DONE = """
DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries WHERE done AND deadline < now() - make_interval(secs => $2)
    LIMIT $1)
"""

# A kept deadline change whose deadline has passed changes nothing any more, stored or not.
CLEAN_DEADLINES = """
DELETE FROM deadline_changes WHERE delivery_id IN (
    SELECT delivery_id FROM deadline_changes WHERE deadline < now() - make_interval(secs => $2)
    LIMIT $1)
"""
KEEP_PASSED_DEADLINES = 60.0


async def clean(
    store: Store, limit: int, keep_done_seconds: float, budget_seconds: float = CLEAN_BUDGET
) -> None:
    """Forget acked deliveries and, after keep_done_seconds, retried, dead or expired ones (and
    deadline changes a minute after their deadline): each statement deletes up to limit rows a
    pass, and runs again while a pass deletes that many, for budget_seconds in all; what is
    left waits for the next clean."""
    with trio.move_on_after(budget_seconds):
        for statement, args in (
            (CLEAN_ACKED, ()),
            (CLEAN_DONE, (keep_done_seconds,)),
            (CLEAN_ORPHANS, (keep_done_seconds,)),
            (CLEAN_DEADLINES, (KEEP_PASSED_DEADLINES,)),
        ):
            while row_count(await store.execute(statement, limit, *args)) >= limit:
                pass


def row_count(status: str) -> int:
    """The row count of a statement's status tag ("DELETE 42", "UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


def new_token() -> str:
    return str(uuid.uuid4())
