"""Declaring queues of a type (amqp.queue_type) against this machine's RabbitMQ, publisher by
publisher in this process: a queue of the other type is diagnosed right whatever else it was
declared with, is remembered for a moment so a client hammering it takes no declaring channels
from others, and a probe never creates a queue. Each test has a virtual host of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.config import AmqpConfig
from eventbus.delivery.envelope import Envelope, Outgoing
from eventbus.delivery.publisher import (
    MISMATCH_SECONDS,
    Publisher,
    delivery_limit,
    queue_arguments,
    refused_argument,
    with_limit,
)
from eventbus.errors import CallError, FailedPrecondition, QueueTypeMismatch, Unavailable
from tests import servers
from tests.test_refusals import delete_queue


@pytest.fixture
def vhost_url() -> Iterator[str]:
    name = servers.unique_name("eventbus_test")
    url = servers.create_vhost(name)
    yield url
    servers.delete_vhost(name)


class CountingPublisher(Publisher):
    """A Publisher that counts the declarations it sends RabbitMQ (passive ones apart)."""

    declares = 0

    async def _declare_with(self, queue: str, arguments: dict[str, Any]) -> None:
        self.declares += 1
        await super()._declare_with(queue, arguments)


@asynccontextmanager
async def publisher(url: str, **settings: Any) -> AsyncIterator[CountingPublisher]:
    config = AmqpConfig(url=url, namespace="ns", **settings)
    async with aio.open_loop(lambda: None):
        broker = Broker(config)
        await broker.connect(10)
        try:
            yield CountingPublisher(broker, config)
        finally:
            await broker.close()


async def declare_plain(url: str, queue: str, **arguments: Any) -> None:
    """(asyncio side) Declare queue durable with arguments, as an operator (or an older bus)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments=arguments or None)


async def queue_exists(url: str, queue: str) -> bool:
    """(asyncio side)"""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        return True


def message(body: str) -> Outgoing:
    return Envelope(str(uuid.uuid4()), body.encode(), 1, None).to_amqp(0)


async def test_a_burst_to_a_queue_of_the_other_type_takes_a_few_declarations(
    vhost_url: str,
) -> None:
    async with publisher(vhost_url, queue_type="quorum") as bus:

        async def burst() -> tuple[list[Any], list[Any]]:
            await declare_plain(vhost_url, "legacy")  # classic
            hammering = [bus.publish("legacy", message(f"m{i}")) for i in range(200)]
            others = [bus.declare(f"fresh-{i}") for i in range(20)]
            results = await asyncio.gather(*hammering, *others, return_exceptions=True)
            return results[:200], results[200:]

        refused, declared = await aio.call(burst)
        assert all(isinstance(r, QueueTypeMismatch) for r in refused), refused[:3]
        assert declared == [None] * 20  # the other queues' declarations went through
        assert bus.declares <= 20 + 3, bus.declares  # legacy: a declaration and a probe or two
        before = bus.declares
        for i in range(50):  # one after another, within the moment it is remembered
            with pytest.raises(QueueTypeMismatch):
                await aio.call(bus.publish, "legacy", message(f"again {i}"))
        assert bus.declares == before
        await trio.sleep(MISMATCH_SECONDS + 0.1)  # forgotten: asked again (migrated meanwhile?)
        with pytest.raises(QueueTypeMismatch, match="exists as a classic queue"):
            await aio.call(bus.publish, "legacy", message("later"))
        assert bus.declares > before


async def test_one_declaration_is_shared_by_callers_at_once(vhost_url: str) -> None:
    async with publisher(vhost_url, queue_type="quorum") as bus:

        async def many() -> list[Any]:
            return await asyncio.gather(*(bus.declare("shared") for _ in range(50)))

        assert await aio.call(many) == [None] * 50
        assert bus.declares == 1


async def test_mismatches_are_not_remembered_past_a_reconnect(vhost_url: str) -> None:
    async with publisher(vhost_url, queue_type="quorum") as bus:
        await aio.call(declare_plain, vhost_url, "legacy")
        with pytest.raises(QueueTypeMismatch):
            await aio.call(bus.declare, "legacy")
        await bus._broker.close()
        await bus._broker.connect(10)
        await aio.call(lambda: asyncio.sleep(0))
        asked = bus.declares
        with pytest.raises(CallError):
            await aio.call(bus.declare, "legacy")
        assert bus.declares > asked


def test_the_argument_a_refusal_names_and_the_value_the_queue_has() -> None:
    head = "PRECONDITION_FAILED - inequivalent arg"
    assert refused_argument(
        f"{head} 'x-expires' for queue 'q' in vhost 'v': received '60000' but current is '3600000'"
    ) == ("x-expires", 3600000)
    assert refused_argument(
        f"{head} 'x-expires' for queue 'q' in vhost 'v': received none but current is the "
        "value '3600000' of type 'signedint'"
    ) == ("x-expires", 3600000)
    assert refused_argument(
        f"{head} 'x-expires' for queue 'q' in vhost 'v': received the value '60000' of type "
        "'signedint' but current is none"
    ) == ("x-expires", None)
    assert refused_argument(
        f"{head} 'x-queue-type' for queue 'q' in vhost 'v': received the value 'quorum' of "
        "type 'longstr' but current is none"
    ) == ("x-queue-type", None)
    assert refused_argument(
        f"{head} 'x-dead-letter-exchange' for queue 'q' in vhost 'v': received none but "
        "current is the value '123' of type 'longstr'"
    ) == ("x-dead-letter-exchange", "123")
    assert refused_argument("NOT_FOUND - no queue 'q' in vhost 'v'") is None


@pytest.mark.parametrize("expires", [3_600_000, None])
async def test_a_queue_of_the_other_type_with_x_expires_is_told_a_type_mismatch(
    vhost_url: str, expires: int | None
) -> None:
    """RabbitMQ compares x-expires first: the queue's own value is adopted to get to its type."""
    arguments = {"x-expires": expires} if expires else {}
    async with publisher(vhost_url, queue_type="quorum", queue_idle_expiry_seconds=60) as bus:
        await aio.call(declare_plain, vhost_url, "expiring", **arguments)
        with pytest.raises(QueueTypeMismatch, match="'expiring' exists as a classic queue"):
            await aio.call(bus.declare, "expiring")


async def test_a_queue_with_other_settings_of_the_same_type_is_no_type_mismatch(
    vhost_url: str,
) -> None:
    async with publisher(vhost_url, queue_type="quorum", queue_idle_expiry_seconds=60) as bus:
        await aio.call(declare_plain, vhost_url, "other", **{"x-queue-type": "quorum"})
        with pytest.raises(FailedPrecondition, match="other settings") as raised:
            await aio.call(bus.declare, "other")
        assert not isinstance(raised.value, QueueTypeMismatch)


class VanishingPublisher(CountingPublisher):
    """Someone deletes the queue right after RabbitMQ refused its declaration."""

    url = ""

    async def _declare_with(self, queue: str, arguments: dict[str, Any]) -> None:
        try:
            await super()._declare_with(queue, arguments)
        except FailedPrecondition:
            if self.declares == 1:
                await delete_queue(self.url, queue)
            raise


async def test_a_probe_never_creates_a_queue_gone_meanwhile(vhost_url: str) -> None:
    config = AmqpConfig(url=vhost_url, namespace="ns", queue_type="quorum")
    async with aio.open_loop(lambda: None):
        broker = Broker(config)
        await broker.connect(10)
        try:
            bus = VanishingPublisher(broker, config)
            bus.url = vhost_url
            await aio.call(declare_plain, vhost_url, "vanishing", **{"x-expires": 60_000})
            with pytest.raises(Unavailable, match="went away"):
                await aio.call(bus.declare, "vanishing")
            assert not await aio.call(queue_exists, vhost_url, "vanishing")
            await aio.call(bus.declare, "vanishing")  # tried again: declared as it should be
        finally:
            await broker.close()


@pytest.mark.parametrize(
    ("version", "limit"),
    [("3.10.8", None), ("3.13.7", None), ("4.0.0", -1), ("4.2.1", -1), (None, None), ("", None)],
)
def test_quorum_queues_get_no_delivery_limit_from_rabbitmq_4_on(
    version: str | None, limit: int | None
) -> None:
    assert delivery_limit(version) == limit
    quorum = AmqpConfig(queue_type="quorum", queue_idle_expiry_seconds=60)
    declared = queue_arguments(quorum, internal=False, server_version=version)
    assert declared.get("x-delivery-limit") == limit
    assert ("x-delivery-limit" in declared) == (limit is not None)
    own = queue_arguments(quorum, internal=True, server_version=version)
    assert own == with_limit({"x-queue-type": "quorum"}, version)  # bookkeeping's, alike
    classic = AmqpConfig(queue_idle_expiry_seconds=60)
    assert "x-delivery-limit" not in queue_arguments(
        classic, internal=False, server_version=version
    )
    assert with_limit({"x-queue-type": "quorum", "x-delivery-limit": -1}, "3.13.7") == {
        "x-queue-type": "quorum"
    }


async def test_the_version_is_read_from_the_broker_and_3_x_gets_no_limit(vhost_url: str) -> None:
    async with publisher(vhost_url, queue_type="quorum") as bus:
        version = bus._broker.server_version
        assert version is not None and version.startswith("3."), version
        assert "x-delivery-limit" not in bus.queue_arguments(internal=False)
        await aio.call(bus.declare, "on-3")


async def test_on_rabbitmq_4_a_quorum_queue_declared_before_without_a_limit_is_taken_as_is(
    vhost_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """This machine runs 3.x: the broker's version is set to what a 4.x broker reports. A new
    queue is declared with x-delivery-limit -1; one declared on 3.x without it (RabbitMQ refuses
    the argument then) is taken as it is, with a warning naming the policy that lifts it."""
    async with publisher(vhost_url, queue_type="quorum") as bus:
        bus._broker.server_version = "4.0.5"
        assert bus.queue_arguments(internal=True)["x-delivery-limit"] == -1
        await aio.call(declare_plain, vhost_url, "from-3x", **{"x-queue-type": "quorum"})
        await aio.call(bus.declare, "new-on-4")
        await aio.call(bus.declare, "from-3x")
        assert "'from-3x' exists without x-delivery-limit" in caplog.text
        assert "delivery-limit -1" in caplog.text and "'new-on-4'" not in caplog.text
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="delivery-limit"):
            await aio.call(declare_plain, vhost_url, "new-on-4", **{"x-queue-type": "quorum"})
