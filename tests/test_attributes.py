"""Message bodies as bytes, with attributes and a publish time, through the whole message path:
envelopes and records as plain data; against the real RabbitMQ and PostgreSQL, a delivery
record retried by the republish job and dead-lettered with them, a delayed message dispatched
with them, a record that dead-letters its message; and a v1 subscriber facing data that is not
UTF-8."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid
from dataclasses import replace
from typing import Any, cast

import aio_pika
import aio_pika.abc
import asyncpg
import pytest

from eventbus.backends import aio
from eventbus.backends.store import Store
from eventbus.config import DeliveryConfig
from eventbus.delivery.envelope import (
    ATTEMPT_HEADER,
    EXPIRES_AT_HEADER,
    PUBLISHED_AT_HEADER,
    DelayedMessage,
    DeliveryRecord,
    Envelope,
    Outgoing,
    new_envelope,
)
from eventbus.delivery.operations import NOT_UTF8, utf8
from eventbus.jobs import delay, ledger
from eventbus.jobs.republish import Republisher
from eventbus.ops.metrics import Metrics, label_values
from tests.bus_client import BusClient
from tests.servers import unique_name
from tests.test_quarantine import count, work_through
from tests.test_refusals import backends, delete_queue

NOW = 1_700_000_000.0
PUBLISHED = 1_699_999_990.5  # a whole number of milliseconds
BODY = b"\x00\xff\xfe binary \n{ \xc3"  # not UTF-8, a NUL, a newline, a lone lead byte
ATTRIBUTES = {"kind": "order", "région": "île-de-france ✓", "empty": ""}


class FakeIncoming:
    """What Envelope.from_amqp reads of an incoming AMQP message."""

    def __init__(
        self,
        body: bytes,
        headers: dict[str, Any] | None,
        message_id: str | None = None,
        timestamp: datetime.datetime | None = None,
    ) -> None:
        self.body, self.headers, self.message_id, self.timestamp = (
            body,
            headers,
            message_id,
            timestamp,
        )


def received(message: Outgoing | FakeIncoming) -> Envelope:
    if isinstance(message, Outgoing):
        properties = message.properties
        message = FakeIncoming(message.body, properties.headers, properties.message_id)
    return Envelope.from_amqp(cast(aio_pika.abc.AbstractIncomingMessage, message))


# Envelopes


def test_an_envelope_round_trips_bytes_attributes_and_publish_time_through_amqp() -> None:
    envelope = Envelope(str(uuid.uuid4()), BODY, 3, NOW + 30, ATTRIBUTES, PUBLISHED)
    message = envelope.to_amqp(NOW)
    assert message.body == BODY
    assert message.properties.content_type == "application/octet-stream"
    headers = message.properties.headers
    assert {k: v for k, v in headers.items() if not k.startswith("x-eventbus-")} == ATTRIBUTES
    assert headers[PUBLISHED_AT_HEADER] == int(PUBLISHED * 1000)
    assert received(message) == envelope


def test_attributes_travel_through_an_amqp_content_header() -> None:
    from pamqp.header import ContentHeader

    message = Envelope("m", BODY, 1, None, ATTRIBUTES, PUBLISHED).to_amqp(NOW)
    decoded = ContentHeader()
    decoded.unmarshal(ContentHeader(0, len(message.body), message.properties).marshal())
    back = received(FakeIncoming(BODY, decoded.properties.headers, "m"))
    assert (back.attributes, back.published_at) == (ATTRIBUTES, PUBLISHED)


def test_an_envelope_without_attributes_or_publish_time_reads_back_the_same() -> None:
    envelope = Envelope(str(uuid.uuid4()), b"plain", 2)
    back = received(envelope.to_amqp(NOW))
    assert back == envelope and back.attributes == {} and back.published_at is None


def test_a_foreign_message_gives_its_headers_as_text_and_its_timestamp_as_publish_time() -> None:
    stamp = datetime.datetime(2024, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
    headers = {"trace": b"\xff-id", "count": 7, "flag": True, ATTEMPT_HEADER: 2, "x-other": "y"}
    envelope = received(FakeIncoming(b"\xff", headers, "order-1", stamp))
    assert envelope.attributes == {
        "trace": "\ufffd-id",
        "count": "7",
        "flag": "True",
        "x-other": "y",
    }
    assert envelope.attempt == 2
    assert envelope.published_at == stamp.timestamp()
    assert envelope.body == b"\xff"


def test_the_bus_header_wins_over_the_amqp_timestamp_and_a_naive_one_is_utc() -> None:
    stamp = datetime.datetime(2024, 5, 1, 12, 0, 0)
    ours = received(FakeIncoming(b"x", {PUBLISHED_AT_HEADER: 1500}, "m", stamp))
    assert ours.published_at == 1.5
    naive = received(FakeIncoming(b"x", None, "m", stamp))
    assert naive.published_at == stamp.replace(tzinfo=datetime.UTC).timestamp()
    assert received(FakeIncoming(b"x", {PUBLISHED_AT_HEADER: "soon"}, "m")).published_at is None


def test_the_bus_headers_are_never_attributes() -> None:
    headers = {ATTEMPT_HEADER: 2, EXPIRES_AT_HEADER: 5000, PUBLISHED_AT_HEADER: 1000}
    assert received(FakeIncoming(b"x", headers, "m")).attributes == {}


def test_a_new_envelope_is_published_now_with_its_attributes_and_id() -> None:
    envelope = new_envelope(BODY, 60, NOW, ATTRIBUTES, "b3c0c2e4-5d7e-4b51-9b6f-0c1a9e4d2f10")
    assert envelope == Envelope(
        "b3c0c2e4-5d7e-4b51-9b6f-0c1a9e4d2f10", BODY, 1, NOW + 60, ATTRIBUTES, NOW
    )
    assert new_envelope(b"x", 0, NOW).attributes == {}


# Records


def record(**changes: Any) -> DeliveryRecord:
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "message_id": str(uuid.uuid4()),
        "queue": unique_name("attributes"),
        "body": BODY,
        "attempt": 1,
        "delivered_at": time.time() - 120,
        "deadline": time.time() - 60,
        "expires_at": None,
        "attributes": ATTRIBUTES,
        "published_at": PUBLISHED,
    }
    return DeliveryRecord(**{**fields, **changes})


def test_a_delivery_record_round_trips_a_binary_body_attributes_and_a_dead_reason() -> None:
    original = record(dead_reason="data is not UTF-8", expires_at=NOW + 5)
    encoded = original.encode()
    assert encoded.endswith(b"\n" + BODY)
    assert DeliveryRecord.decode(encoded) == original
    plain = record(attributes={}, published_at=None)
    assert DeliveryRecord.decode(plain.encode()) == plain
    assert b'"attributes"' not in plain.encode() and b'"dead_reason"' not in plain.encode()


def test_a_delayed_message_round_trips_and_its_envelope_carries_everything() -> None:
    delayed = DelayedMessage("i", "topic", "t", BODY, NOW, 30, ATTRIBUTES, 4, PUBLISHED)
    assert DelayedMessage.decode(delayed.encode()) == delayed
    assert delayed.envelope(NOW + 1) == Envelope("i", BODY, 4, NOW + 31, ATTRIBUTES, PUBLISHED)
    fresh = DelayedMessage("j", "queue", "q", b"x", NOW, 0)
    assert DelayedMessage.decode(fresh.encode()) == fresh
    assert fresh.envelope(NOW + 1) == Envelope("j", b"x", 1, None, {}, NOW + 1)


def test_records_of_the_previous_version_still_decode() -> None:
    header = b'{"id":"d","message_id":"m","queue":"q","attempt":2,"delivered_at":1.0,'
    header += b'"deadline":2.0,"expires_at":null}'
    old = DeliveryRecord.decode(header + "\n✓ text\n".encode())
    assert old == DeliveryRecord("d", "m", "q", "✓ text\n".encode(), 2, 1.0, 2.0, None)
    assert (old.attributes, old.published_at, old.dead_reason) == ({}, None, None)
    delayed = b'{"id":"i","kind":"queue","target":"q","due_at":5.0,"ttl_seconds":0}\n'
    delayed += "hé".encode()
    assert DelayedMessage.decode(delayed) == DelayedMessage(
        "i", "queue", "q", "hé".encode(), 5.0, 0
    )


def test_a_record_whose_attributes_are_not_text_is_malformed() -> None:
    header = b'{"id":"d","message_id":"m","queue":"q","attempt":1,"delivered_at":1.0,'
    header += b'"deadline":2.0,"expires_at":null,"attributes":{"n":1}}'
    with pytest.raises(ValueError, match="attributes"):
        DeliveryRecord.decode(header + b"\nx")


def test_only_utf8_bodies_are_v1_data() -> None:
    assert utf8(b"plain") and utf8("日本語 ✓".encode()) and utf8(b"")
    assert not utf8(BODY) and not utf8(b"ok \xc3")


# Against RabbitMQ and PostgreSQL


async def take_all(amqp_url: str, queue: str) -> list[Envelope]:
    """(asyncio side) Every message waiting in queue, read as the bus reads it; queue deleted."""
    envelopes = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            envelopes.append(Envelope.from_amqp(message))
        await declared.delete(if_unused=False, if_empty=False)
    return envelopes


async def store_records(amqp_url: str, store: Store, records: list[DeliveryRecord]) -> None:
    """Send records through a bookkeeping worker of the confirm queue, as hand-outs do."""
    ids = list({r.id for r in records})

    async def done() -> bool:
        stored = await store.fetchval("SELECT count(*) FROM deliveries WHERE id = ANY($1)", ids)
        return bool(stored == len(ids))

    bodies = [r.encode() for r in records]
    await work_through(amqp_url, store, bodies, DeliveryRecord.decode, ledger.write_records, done)


async def retry_tick(
    amqp_url: str, store: Store, publisher: Any, metrics: Metrics, max_retries: int
) -> None:
    """One republish tick, every settlement up to now counted as applied."""
    await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, time.time())
    marks = unique_name("ns.marks")
    config = DeliveryConfig(max_retries=max_retries)
    await Republisher(store, publisher, config, metrics, 60, settlements_queue=marks).tick()
    await aio.call(delete_queue, amqp_url, marks)


async def test_a_record_is_retried_and_dead_lettered_with_its_body_attributes_and_time(
    amqp_url: str, postgres_dsn: str
) -> None:
    first = record()
    async with backends(amqp_url, postgres_dsn) as (store, publisher):
        await store_records(amqp_url, store, [first])
        [row] = await store.fetch(
            "SELECT body, attributes, extract(epoch FROM published_at) AS published_at "
            "FROM deliveries"
        )
        assert (row["body"], json.loads(row["attributes"])) == (BODY, ATTRIBUTES)
        assert float(row["published_at"]) == PUBLISHED
        metrics = Metrics("test")
        await retry_tick(amqp_url, store, publisher, metrics, max_retries=1)
        [retry] = await aio.call(take_all, amqp_url, first.queue)
        assert retry == Envelope(first.message_id, BODY, 2, None, ATTRIBUTES, PUBLISHED)

        second = record(
            message_id=retry.message_id,
            queue=first.queue,
            attempt=retry.attempt,
            attributes=retry.attributes,
            published_at=retry.published_at,
        )
        await store_records(amqp_url, store, [second])
        await retry_tick(amqp_url, store, publisher, metrics, max_retries=1)
        assert await aio.call(take_all, amqp_url, first.queue) == []
        [letter] = await store.fetch(
            "SELECT message_id::text, body, attempts, attributes, reason, "
            "extract(epoch FROM published_at) AS published_at FROM dead_letters"
        )
    assert (letter["message_id"], letter["body"], letter["attempts"]) == (first.message_id, BODY, 2)
    assert json.loads(letter["attributes"]) == ATTRIBUTES and letter["reason"] is None
    assert float(letter["published_at"]) == PUBLISHED
    assert label_values(metrics.dead_lettered) == {first.queue: 1.0}


async def test_a_delayed_message_is_dispatched_with_its_attempt_attributes_and_time(
    amqp_url: str, postgres_dsn: str
) -> None:
    queue = unique_name("delayed")
    due = time.time() - 1
    retry = DelayedMessage(
        str(uuid.uuid4()), "queue", queue, BODY, due, 0, ATTRIBUTES, 3, PUBLISHED
    )
    fresh = DelayedMessage(str(uuid.uuid4()), "queue", queue, b"fresh", due, 0)
    async with backends(amqp_url, postgres_dsn) as (store, publisher):

        async def done() -> bool:
            return await count(store, "delayed_messages") == 2

        bodies = [retry.encode(), fresh.encode()]
        await work_through(amqp_url, store, bodies, DelayedMessage.decode, delay.write, done)
        before = time.time()
        await delay.Dispatcher(store, publisher, Metrics("test"), 60, 1).tick()
        after = time.time()
        envelopes = {e.message_id: e for e in await aio.call(take_all, amqp_url, queue)}
    assert envelopes[retry.id] == Envelope(retry.id, BODY, 3, None, ATTRIBUTES, PUBLISHED)
    dispatched = envelopes[fresh.id]
    assert (dispatched.attempt, dispatched.attributes, dispatched.body) == (1, {}, b"fresh")
    assert dispatched.published_at is not None
    assert before - 0.001 <= dispatched.published_at <= after + 0.001


async def test_a_record_with_a_dead_reason_becomes_a_dead_letter_once(
    amqp_url: str, postgres_dsn: str
) -> None:
    dead = record(attempt=2, dead_reason="nacked to dead letters by the subscriber")
    async with backends(amqp_url, postgres_dsn) as (store, publisher):
        await store_records(amqp_url, store, [dead])
        await store_records(amqp_url, store, [dead])  # the same record again changes nothing
        letters = await store.fetch(
            "SELECT message_id::text, last_delivery_id::text, body, attempts, attributes, reason, "
            "extract(epoch FROM published_at) AS published_at, dead_at FROM dead_letters"
        )
        [delivery] = await store.fetch("SELECT done, outcome FROM deliveries")
        assert await ledger.claim_due(store, ledger.new_token(), 10, 0, 60) == []
        metrics = Metrics("test")
        await retry_tick(amqp_url, store, publisher, metrics, max_retries=5)
        assert await aio.call(take_all, amqp_url, dead.queue) == []
    [letter] = letters
    assert (letter["message_id"], letter["last_delivery_id"]) == (dead.message_id, dead.id)
    assert (letter["body"], letter["attempts"]) == (BODY, 2)
    assert letter["reason"] == "nacked to dead letters by the subscriber"
    assert json.loads(letter["attributes"]) == ATTRIBUTES
    assert float(letter["published_at"]) == PUBLISHED
    assert (delivery["done"], delivery["outcome"]) == (True, "dead")
    assert label_values(metrics.republished) == {}


async def test_a_delivery_already_recorded_is_dead_lettered_by_a_later_record(
    amqp_url: str, postgres_dsn: str
) -> None:
    handed_out = record(deadline=time.time() + 600)
    async with backends(amqp_url, postgres_dsn) as (store, _):
        await store_records(amqp_url, store, [handed_out])
        await ledger.write_records(store, [replace(handed_out, dead_reason="nacked")])
        [delivery] = await store.fetch("SELECT done, outcome FROM deliveries")
        reasons = [row["reason"] for row in await store.fetch("SELECT reason FROM dead_letters")]
    assert (delivery["done"], delivery["outcome"]) == (True, "dead")
    assert reasons == ["nacked"]


# v1 against a real daemon


async def put_raw(amqp_url: str, queue: str, messages: list[tuple[bytes, dict[str, Any]]]) -> None:
    """(asyncio side) Publish straight to a durable queue, as another publisher (or v2) does."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        for body, headers in messages:
            message = aio_pika.Message(
                body,
                headers=headers,
                message_id=str(uuid.uuid4()),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, routing_key=queue)


async def dead_letters(dsn: str) -> list[Any]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(
            await connection.fetch(
                "SELECT queue, body, attempts, attributes::text, reason, "
                "extract(epoch FROM published_at) AS published_at FROM dead_letters"
            )
        )
    finally:
        await connection.close()


def test_a_v1_subscriber_dead_letters_data_that_is_not_utf8_and_gets_the_next_message(
    make_daemon: Any, backends: Any
) -> None:
    fast = {"delivery": {"ack_deadline_seconds": 1}, "cron": {"interval_seconds": 0.2}}
    daemon = make_daemon(**fast)
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("mixed")
    binary = (BODY, {"kind": "blob", PUBLISHED_AT_HEADER: int(PUBLISHED * 1000)})
    asyncio.run(put_raw(backends.amqp_url, queue, [binary, ("after ✓".encode(), {})]))
    try:
        reply = client.subscribe(queue, timeout=10)
        assert reply.data == "after ✓"
        client.ack(reply.id)
        deadline = time.monotonic() + 10
        while not (letters := asyncio.run(dead_letters(backends.postgres_dsn))):
            assert time.monotonic() < deadline, "no dead letter appeared"
            time.sleep(0.1)
        time.sleep(2)  # past the ack deadline and several republish ticks: it never comes back
        assert client.try_subscribe(queue, timeout=1) is None
        metrics = daemon.http_get("/metrics")[1]
    finally:
        client.close()
    [letter] = letters
    assert (letter["queue"], letter["body"], letter["attempts"]) == (queue, BODY, 1)
    assert json.loads(letter["attributes"]) == {"kind": "blob"}
    assert letter["reason"] == NOT_UTF8 and float(letter["published_at"]) == PUBLISHED
    assert f'eventbus_dead_lettered_total{{queue="{queue}"}} 1.0' in metrics
