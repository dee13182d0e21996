"""The crons against the real RabbitMQ and PostgreSQL when one message of a batch cannot be
published: the others go exactly once, the bad one is set aside with its reason, and the job
never stalls on it."""

from __future__ import annotations

import datetime
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.backends.store import Store, open_store
from eventbus.config import AmqpConfig, DeliveryConfig, PostgresConfig
from eventbus.delivery.publisher import Publisher
from eventbus.errors import Unavailable
from eventbus.jobs import deadletters, delay, ledger
from eventbus.jobs.republish import Republisher
from eventbus.ops.metrics import Metrics, label_values
from tests.servers import unique_name

FAR = 10**12  # seconds: an expiration RabbitMQ refuses (value_too_large)


@asynccontextmanager
async def backends(
    amqp_url: str, postgres_dsn: str, *, auto_create_queues: bool = True
) -> AsyncIterator[tuple[Store, Publisher]]:
    config = AmqpConfig(url=amqp_url, namespace="ns", publish_channels=2)
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        broker = Broker(config)
        await broker.connect(10)
        try:
            yield store, Publisher(broker, config, auto_create_queues=auto_create_queues)
        finally:
            await broker.close()
            await store.close()


async def drain(amqp_url: str, queue: str) -> Counter[str]:
    """(asyncio side) Every message waiting in queue, by body."""
    seen: Counter[str] = Counter()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        while (received := await declared.get(no_ack=True, fail=False)) is not None:
            seen[received.body.decode()] += 1
    return seen


def ago(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)


async def add_delayed(store: Store, kind: str, target: str, body: str, ttl: int) -> str:
    message_id = str(uuid.uuid4())
    await store.execute(
        "INSERT INTO delayed_messages (id, kind, target, body, due_at, ttl_seconds) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        message_id,
        kind,
        target,
        body.encode(),
        ago(5),
        ttl,
    )
    return message_id


async def test_a_delay_batch_with_unpublishable_messages(amqp_url: str, postgres_dsn: str) -> None:
    queue = unique_name("delayed")
    async with backends(amqp_url, postgres_dsn) as (store, publisher):
        for i in range(10):
            await add_delayed(store, "queue", queue, f"m{i}", 0)
        refused_ttl = await add_delayed(store, "queue", queue, "far ttl", FAR)
        bad_topic = await add_delayed(store, "topic", "caf\u00e9", "bad name", 0)
        for i in range(10, 20):
            await add_delayed(store, "queue", queue, f"m{i}", 60)
        metrics = Metrics("test")
        job = delay.Dispatcher(store, publisher, metrics, claim_seconds=60, interval=1)
        for _ in range(4):  # several ticks: nothing fails, nothing goes twice
            await job.tick()
        seen = await aio.call(drain, amqp_url, queue)
        quarantined = await delay.pending(store, None, None, 10, quarantined=True)
        assert await delay.pending(store, None, None, 10) == quarantined
    assert set(seen) == {f"m{i}" for i in range(20)} and max(seen.values()) <= 2
    reasons = {p.id: p.quarantine_reason or "" for p in quarantined}
    assert sorted(reasons) == sorted([refused_ttl, bad_topic])
    assert "PRECONDITION_FAILED" in reasons[refused_ttl] and "expiration" in reasons[refused_ttl]
    assert "exchange" in reasons[bad_topic]
    assert sum(label_values(metrics.quarantined).values()) == 2
    assert sum(label_values(metrics.delay_dispatched).values()) == 20


async def add_due_delivery(store: Store, queue: str, body: str, expires_in: float | None) -> str:
    message_id = str(uuid.uuid4())
    expires_at = None if expires_in is None else time.time() + expires_in
    await store.execute(
        "INSERT INTO deliveries (id, message_id, queue, body, attempt, delivered_at, deadline, "
        "expires_at) VALUES ($1, $2, $3, $4, 1, $5, $6, to_timestamp($7::float8))",
        uuid.uuid4(),
        message_id,
        queue,
        body.encode(),
        ago(120),
        ago(60),
        expires_at,
    )
    # every settlement published up to now has been applied: the deadline counts as missed
    await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, time.time())
    return message_id


def republisher(store: Store, publisher: Publisher, metrics: Metrics, marks: str) -> Republisher:
    return Republisher(store, publisher, DeliveryConfig(), metrics, 60, settlements_queue=marks)


async def test_a_republish_batch_with_a_refused_retry(amqp_url: str, postgres_dsn: str) -> None:
    queue, marks = unique_name("retried"), unique_name("ns.marks")
    async with backends(amqp_url, postgres_dsn) as (store, publisher):
        for i in range(15):
            await add_due_delivery(store, queue, f"r{i}", None)
        refused = await add_due_delivery(store, queue, "far expiry", FAR)
        for i in range(15, 30):
            await add_due_delivery(store, queue, f"r{i}", 3600)
        metrics = Metrics("test")
        job = republisher(store, publisher, metrics, marks)
        for _ in range(3):
            await job.tick()
        seen = await aio.call(drain, amqp_url, queue)
        await aio.call(delete_queue, amqp_url, marks)
        letters = await deadletters.list_letters(store, deadletters.Selection(), 10)
        open_rows = await store.fetchval("SELECT count(*) FROM deliveries WHERE NOT done")
    assert set(seen) == {f"r{i}" for i in range(30)} and max(seen.values()) <= 2
    [letter] = letters
    assert (letter.message_id, letter.body, letter.queue) == (refused, b"far expiry", queue)
    assert letter.reason is not None and "refused its retry" in letter.reason
    assert "expiration" in letter.reason
    assert open_rows == 0
    assert label_values(metrics.republished) == {queue: 30.0}
    assert label_values(metrics.dead_lettered) == {queue: 1.0}


async def test_requeue_keeps_what_rabbitmq_refuses(amqp_url: str, postgres_dsn: str) -> None:
    queue = unique_name("requeued")

    async def bury(store: Store, name: str, body: str) -> None:
        await store.execute(
            "INSERT INTO dead_letters (queue, message_id, body, attempts, last_delivery_id, "
            "last_failure_at) VALUES ($1, $2, $3, 4, $4, now())",
            name,
            uuid.uuid4(),
            body.encode(),
            uuid.uuid4(),
        )

    async with backends(amqp_url, postgres_dsn) as (store, publisher):
        for i in range(5):
            await bury(store, queue, f"d{i}")
        await bury(store, "bad\nname", "stays")
        moved, kept = await deadletters.requeue(store, publisher, deadletters.Selection())
        left: Any = await deadletters.list_letters(store, deadletters.Selection(), 10)
        seen = await aio.call(drain, amqp_url, queue)
    assert (moved, kept) == (5, 1)
    assert [d.body for d in left] == [b"stays"]
    assert seen == Counter(f"d{i}" for i in range(5))


async def declare_full_queue(amqp_url: str, queue: str) -> None:
    """(asyncio side) A queue of one message that refuses more (x-overflow reject-publish), full."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        arguments = {"x-max-length": 1, "x-overflow": "reject-publish"}
        await channel.declare_queue(queue, durable=True, arguments=arguments)
        await channel.default_exchange.publish(aio_pika.Message(b"first"), queue)


async def delete_queue(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await (await connection.channel()).queue_delete(queue)


async def test_retries_to_a_full_queue_wait_and_the_others_go(
    amqp_url: str, postgres_dsn: str
) -> None:
    full, fine, marks = unique_name("full"), unique_name("fine"), unique_name("ns.marks")
    async with backends(amqp_url, postgres_dsn, auto_create_queues=False) as (store, publisher):
        await aio.call(declare_full_queue, amqp_url, full)
        await aio.call(drain, amqp_url, fine)  # declares it
        for i in range(3):
            await add_due_delivery(store, full, f"f{i}", None)
        for i in range(10):
            await add_due_delivery(store, fine, f"r{i}", None)
        job = republisher(store, publisher, Metrics("test"), marks)
        await job.tick()  # RabbitMQ nacks the three: they wait, the tick goes on
        waiting = await store.fetch(
            "SELECT queue, claim_token, claimed_until > now() AS later FROM deliveries "
            "WHERE NOT done"
        )
        seen = await aio.call(drain, amqp_url, fine)
        await aio.call(delete_queue, amqp_url, full)
        await aio.call(delete_queue, amqp_url, marks)
    assert [(r["queue"], r["claim_token"], r["later"]) for r in waiting] == [(full, None, True)] * 3
    assert set(seen) == {f"r{i}" for i in range(10)}


async def test_a_delayed_message_for_a_missing_queue_waits_until_it_exists(
    amqp_url: str, postgres_dsn: str
) -> None:
    queue = unique_name("later")
    config = AmqpConfig(url=amqp_url, namespace="ns", publish_channels=2)
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        broker = Broker(config)
        await broker.connect(10)
        try:
            waiting = await add_delayed(store, "queue", queue, "patient", 0)
            publisher = Publisher(broker, config, auto_create_queues=False)
            job = delay.Dispatcher(store, publisher, Metrics("test"), 60, 1)
            with pytest.raises(Unavailable, match="does not exist"):
                await job.tick()  # the batch's only message waits: nothing more this tick
            [row] = await delay.pending(store, None, None, 10)
            await aio.call(drain, amqp_url, queue)  # the queue now exists
            await store.execute("UPDATE delayed_messages SET claimed_until = NULL")
            await job.tick()
            left = await delay.pending(store, None, None, 10)
            seen = await aio.call(drain, amqp_url, queue)
        finally:
            await broker.close()
            await store.close()
    assert (row.id, row.quarantined_at, row.publish_failures) == (waiting, None, 1)
    assert row.last_failure is not None and "does not exist" in row.last_failure
    assert left == [] and seen == Counter({"patient": 1})
