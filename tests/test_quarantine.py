"""Bookkeeping batches with rows PostgreSQL refuses, against the real RabbitMQ and PostgreSQL:
every other row is stored, the refused ones (and unreadable messages) are quarantined, and all
are acked. PostgreSQL going away meanwhile still makes the whole batch wait and go again."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import trio

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.backends.store import Store
from eventbus.config import AmqpConfig
from eventbus.delivery.envelope import DelayedMessage, DeliveryRecord
from eventbus.jobs import bookkeeping, delay, ledger, quarantine
from eventbus.ops.metrics import Metrics, label_values
from tests.servers import unique_name, with_store

PATIENCE = 20.0


def record(body: str = "hello", queue: str = "orders", expires_at: float | None = None) -> Any:
    now = time.time()
    return DeliveryRecord(
        str(uuid.uuid4()), str(uuid.uuid4()), queue, body.encode(), 1, now, now + 60, expires_at
    )


async def fill(amqp_url: str, queue: str, bodies: Sequence[bytes]) -> None:
    """(asyncio side) Put raw messages on a durable queue, as the bus's publishers do."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), queue)


async def depth(amqp_url: str, queue: str) -> int:
    """(asyncio side) Messages ready or unacked on a queue."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        return int(declared.declaration_result.message_count or 0)


async def work_through(
    amqp_url: str,
    store: Any,
    bodies: Sequence[bytes],
    decode: Callable[[bytes], Any],
    writer: bookkeeping.Writer[Any],
    done: Callable[[], Awaitable[bool]],
) -> Metrics:
    """Run one bookkeeping worker over bodies until done() (at most PATIENCE seconds)."""
    queue = unique_name("ns.internal")
    await aio.call(fill, amqp_url, queue, bodies)
    broker = Broker(AmqpConfig(url=amqp_url))
    await broker.connect(10)
    metrics = Metrics("test")
    worker = bookkeeping.Worker(broker, store, metrics, queue, decode, writer, 2)

    async def finished() -> bool:
        return await done() and await aio.call(depth, amqp_url, queue) == 0

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            with trio.fail_after(PATIENCE):
                while not await finished():  # noqa: ASYNC110 (polls PostgreSQL and RabbitMQ)
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        await broker.close()
    return metrics


async def count(store: Store, table: str) -> int:
    return int(await store.fetchval(f"SELECT count(*) FROM {table}"))


async def test_refused_delivery_records_are_quarantined_and_the_rest_stored(
    amqp_url: str, postgres_dsn: str
) -> None:
    good = [record(f"m{i}") for i in range(20)] + [record("nul \x00 inside")]
    out_of_range = record("far", expires_at=1e19)  # beyond PostgreSQL's timestamps
    nul_queue = record("x", queue="q\x00q")  # text columns take no NUL
    bodies = [r.encode() for r in good[:10]] + [out_of_range.encode(), b"{not json"]
    bodies += [nul_queue.encode()] + [r.encode() for r in good[10:]]

    async def work(store: Store) -> None:
        async def done() -> bool:
            return await count(store, "deliveries") + await count(store, "quarantine") == 24

        metrics = await work_through(
            amqp_url, store, bodies, DeliveryRecord.decode, ledger.write_records, done
        )
        rows = await store.fetch("SELECT id::text, body FROM deliveries")
        assert {r["id"]: r["body"] for r in rows} == {r.id: r.body for r in good}
        kept = await quarantine.listed(store, None, 10)
        assert sorted(q.body for q in kept) == sorted(
            [out_of_range.encode(), b"{not json", nul_queue.encode()]
        )
        reasons = " | ".join(q.reason for q in kept)
        assert "out of range" in reasons and "malformed" in reasons and "0x00" in reasons
        assert list(label_values(metrics.quarantined).values()) == [3.0]

    await with_store(postgres_dsn, work)


async def test_a_delayed_message_out_of_range_is_quarantined_and_the_rest_stored(
    amqp_url: str, postgres_dsn: str
) -> None:
    due = time.time() + 3600
    good = [DelayedMessage(str(uuid.uuid4()), "queue", "q", b"d%d" % i, due, 0) for i in range(30)]
    bad = DelayedMessage(str(uuid.uuid4()), "queue", "q", b"ttl", due, 2**64 - 1)
    bodies = [m.encode() for m in good[:15]] + [bad.encode()] + [m.encode() for m in good[15:]]

    async def work(store: Store) -> None:
        async def done() -> bool:
            return await count(store, "delayed_messages") + await count(store, "quarantine") == 31

        await work_through(amqp_url, store, bodies, DelayedMessage.decode, delay.write, done)
        stored = await delay.pending(store, None, None, 100)
        assert sorted(p.id for p in stored) == sorted(m.id for m in good)
        [kept] = await quarantine.listed(store, None, 10)
        assert kept.body == bad.encode() and "int64" in kept.reason

    await with_store(postgres_dsn, work)


class FlakyStore:
    """The real store, but the first `failures` writes fail as a lost connection does."""

    def __init__(self, store: Store, failures: int) -> None:
        self._store = store
        self.failures = failures

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionResetError("PostgreSQL went away (test)")

    async def fetch(self, sql: str, *args: Any) -> Any:
        self._maybe_fail()
        return await self._store.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self._maybe_fail()
        return await self._store.execute(sql, *args)


async def test_a_lost_connection_retries_the_whole_batch_and_sets_nothing_aside(
    amqp_url: str, postgres_dsn: str
) -> None:
    records = [record(f"m{i}") for i in range(50)]

    async def work(store: Store) -> None:
        flaky = FlakyStore(store, failures=3)

        async def done() -> bool:
            return await count(store, "deliveries") == 50

        await work_through(
            amqp_url,
            flaky,
            [r.encode() for r in records],
            DeliveryRecord.decode,
            ledger.write_records,
            done,
        )
        assert flaky.failures == 0
        assert await count(store, "quarantine") == 0

    await with_store(postgres_dsn, work)
