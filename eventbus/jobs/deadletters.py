"""Dead letters: listing them and putting them back on their queue (eventbus dead-letters)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

from ..backends.broker import Broker
from ..backends.store import Store, open_store
from ..config import Config
from ..delivery.envelope import Envelope, no_attributes
from ..delivery.publisher import Publisher
from .ledger import attributes_from

logger = logging.getLogger(__name__)

REQUEUE_BATCH = 500


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    message_id: str
    body: bytes
    attempts: int
    last_failure_at: datetime
    dead_at: datetime
    reason: str | None  # None: it failed max_retries + 1 deliveries
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    published_at: float | None = None

    def envelope(self) -> Envelope:
        """The dead letter as a fresh message: attempt 1, same id, attributes and publish
        time, no TTL."""
        return Envelope(self.message_id, self.body, 1, None, self.attributes, self.published_at)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command means: of one queue (None: every queue), of these messages
    (none: all of them)."""

    queue: str | None = None
    message_ids: tuple[str, ...] = ()

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        if self.queue is not None:
            args.append(self.queue)
            clauses.append(f"queue = ${len(args)}")
        if self.message_ids:
            args.append(list(self.message_ids))
            clauses.append(f"message_id = ANY(${len(args)}::uuid[])")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


async def list_letters(
    store: Store, selection: Selection, limit: int, offset: int = 0
) -> list[DeadLetter]:
    """Dead letters in the order they died, oldest first, from the offset-th on."""
    where, args = selection.where()
    rows = await store.fetch(
        "SELECT queue, message_id, body, attempts, last_failure_at, dead_at, reason, "
        "attributes, extract(epoch FROM published_at) AS published_at "
        f"FROM dead_letters{where} ORDER BY dead_at, queue, message_id "
        f"LIMIT ${len(args) + 1} OFFSET ${len(args) + 2}",
        *args,
        limit,
        offset,
    )
    return [
        DeadLetter(
            r["queue"],
            str(r["message_id"]),
            r["body"],
            r["attempts"],
            r["last_failure_at"],
            r["dead_at"],
            r["reason"],
            attributes_from(r["attributes"]),
            float(r["published_at"]) if r["published_at"] is not None else None,
        )
        for r in rows
    ]


async def requeue(store: Store, publisher: Publisher, selection: Selection) -> tuple[int, int]:
    """Publish the selected dead letters again as fresh messages (attempt 1, same message id,
    no TTL), then forget them; returns how many went back and how many RabbitMQ did not take
    (those stay, each failure logged)."""
    moved = kept = 0
    while batch := await list_letters(store, selection, REQUEUE_BATCH, offset=kept):
        now = time.time()
        outcomes = await publisher.to_targets(
            [(("queue", d.queue), d.envelope().to_amqp(now)) for d in batch]
        )
        gone = [d for d, o in zip(batch, outcomes, strict=True) if o.status == "confirmed"]
        for letter, outcome in zip(batch, outcomes, strict=True):
            if outcome.status != "confirmed":
                logger.warning("dead letter %s stays: %s", letter.message_id, outcome.reason)
        await store.execute(
            "DELETE FROM dead_letters d USING unnest($1::text[], $2::uuid[]) AS g(queue, id) "
            "WHERE d.queue = g.queue AND d.message_id = g.id",
            [d.queue for d in gone],
            [d.message_id for d in gone],
        )
        moved, kept = moved + len(gone), kept + len(batch) - len(gone)
    return moved, kept


@asynccontextmanager
async def connected(config: Config) -> AsyncIterator[tuple[Store, Publisher]]:
    """A store and a publisher for one command, closed afterwards."""
    window = config.amqp.reconnect_window_seconds
    store = await open_store(config.postgres, window)
    broker = Broker(config.amqp)
    try:
        await broker.connect(window)
        auto_create = config.server.auto_create_queues
        yield store, Publisher(broker, config.amqp, auto_create_queues=auto_create)
    finally:
        await broker.close()
        await store.close()
