"""The publisher against the real RabbitMQ: per-message outcomes of a bulk publish, one shared
pool of channels however many queues, and the queue declaration policy."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import aio_pika
import aio_pika.abc
import aiormq
import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.config import AmqpConfig
from eventbus.delivery.channels import (
    DECLARED_MAX,
    DECLARING_CHANNELS,
    PUBLISH_TIMEOUT,
    Declared,
    open_channel,
)
from eventbus.delivery.envelope import Envelope, Outgoing
from eventbus.delivery.publisher import Outcome, Publisher, Target
from eventbus.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from tests.servers import unique_name

NEVER = 1e12  # an expiry so far off (year 33658) that RabbitMQ refuses the expiration


@asynccontextmanager
async def publisher(amqp_url: str, **settings: Any) -> AsyncIterator[tuple[Publisher, Broker]]:
    auto_create = settings.pop("auto_create_queues", True)
    config = AmqpConfig(url=amqp_url, namespace="ns", **settings)
    async with aio.open_loop(lambda: None):
        broker = Broker(config)
        await broker.connect(10)
        try:
            yield Publisher(broker, config, auto_create_queues=auto_create), broker
        finally:
            await broker.close()


def message(body: str, expires_at: float | None = None) -> Outgoing:
    return Envelope(str(uuid.uuid4()), body.encode(), 1, expires_at).to_amqp(0)


async def drain(amqp_url: str, queue: str) -> Counter[str]:
    """(asyncio side) Every message waiting in queue, by body; the queue is deleted after."""
    seen: Counter[str] = Counter()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (received := await declared.get(no_ack=True, fail=False)) is not None:
            seen[received.body.decode()] += 1
        await declared.delete(if_unused=False, if_empty=False)
    return seen


def channel_count(broker: Broker) -> int:
    return len(broker.connection.transport.connection.channels)


async def test_only_the_messages_that_cannot_go_are_refused(amqp_url: str) -> None:
    queue = unique_name("outcomes")
    batch: list[tuple[Target, Outgoing]] = [
        (("queue", queue), message(f"m{i}")) for i in range(300)
    ]
    batch[17] = (("queue", queue), message("refused by RabbitMQ", expires_at=NEVER))
    batch[150] = (("topic", "caf\u00e9"), message("refused by pamqp"))
    batch[151] = (("queue", "bad\nname"), message("a queue pamqp cannot declare"))
    async with publisher(amqp_url, publish_channels=2) as (bus, _):
        outcomes = await bus.to_targets(batch)
        seen = await aio.call(drain, amqp_url, queue)
    refused = {i: o.reason for i, o in enumerate(outcomes) if o.status != "confirmed"}
    assert sorted(refused) == [17, 150, 151]
    assert all(outcomes[i].status == "refused" for i in refused)
    assert "PRECONDITION_FAILED" in refused[17] and "expiration" in refused[17]
    assert "exchange" in refused[150] and "queue" in refused[151]
    # each at least once: those sent before a refused message on its channel may go twice
    assert set(seen) == {f"m{i}" for i in range(300) if i not in refused}
    assert max(seen.values()) <= 2


async def test_a_single_publish_refused_by_rabbitmq_is_failed_precondition(amqp_url: str) -> None:
    queue = unique_name("single")
    async with publisher(amqp_url) as (bus, _):
        with pytest.raises(FailedPrecondition, match="expiration"):
            await aio.call(bus.publish, queue, message("x", expires_at=NEVER))
        await aio.call(bus.publish, queue, message("fine"))
        seen = await aio.call(drain, amqp_url, queue)
    assert seen == Counter({"fine": 1})


async def test_many_queues_share_one_bounded_pool_of_channels(amqp_url: str) -> None:
    # 1,200 queues: the old publisher opened 2 channels per queue, past RabbitMQ's channel_max
    queues = [unique_name("many") for _ in range(1200)]
    async with publisher(amqp_url, publish_channels=4) as (bus, broker):
        for start in range(0, len(queues), 500):
            chunk = queues[start : start + 500]
            outcomes = await bus.to_targets([(("queue", q), message(q)) for q in chunk])
            assert {o.status for o in outcomes} == {"confirmed"}
            assert channel_count(broker) <= 4 + DECLARING_CHANNELS
        for queue in queues[:200]:
            await aio.call(bus.publish, queue, message("again"))
        assert channel_count(broker) <= 4 + DECLARING_CHANNELS
        assert await aio.call(bus.message_count, queues[0]) == 2


async def test_without_auto_create_a_missing_queue_is_not_found(amqp_url: str) -> None:
    queue = unique_name("absent")
    async with publisher(amqp_url, auto_create_queues=False) as (bus, _):
        with pytest.raises(NotFound, match=f"queue '{queue}' does not exist"):
            await aio.call(bus.publish, queue, message("x"))
        [outcome] = await bus.to_targets([(("queue", queue), message("y"))])
        assert outcome.status == "unavailable" and isinstance(outcome.error, NotFound)
        await aio.call(bus.publish, "ns.internal", message("the bus's own queues are created"))
        await aio.call(declare_plain, amqp_url, queue)
        await aio.call(bus.publish, queue, message("now it exists"))
        seen = await aio.call(drain, amqp_url, queue)
        await aio.call(drain, amqp_url, "ns.internal")
    assert seen == Counter({"now it exists": 1})


async def declare_plain(amqp_url: str, queue: str) -> None:
    """(asyncio side) Declare a durable queue without arguments, as a client of its own would."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        await (await connection.channel()).declare_queue(queue, durable=True)


async def test_idle_expiry_goes_on_client_queues_only(amqp_url: str) -> None:
    queue = unique_name("expiring")
    async with publisher(amqp_url, queue_idle_expiry_seconds=600) as (bus, _):
        await aio.call(bus.declare, queue)
        await aio.call(bus.declare, "ns.confirm")
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed, match="x-expires"):
            await aio.call(declare_plain, amqp_url, queue)  # it carries x-expires
        await aio.call(declare_plain, amqp_url, "ns.confirm")  # it does not
        await aio.call(drain, amqp_url, queue)
        await aio.call(drain, amqp_url, "ns.confirm")


async def test_a_queue_with_other_settings_names_itself_and_the_fix(amqp_url: str) -> None:
    queue = unique_name("other")
    async with publisher(amqp_url, queue_idle_expiry_seconds=60) as (bus, _):
        await aio.call(declare_plain, amqp_url, queue)
        with pytest.raises(FailedPrecondition) as refused:
            await aio.call(bus.publish, queue, message("x"))
        await aio.call(
            bus.publish, unique_name("fine"), message("a refused declaration harms no other")
        )
        await aio.call(drain, amqp_url, queue)
    assert f"queue '{queue}' exists with other settings" in refused.value.message
    assert "x-expires=60000" in refused.value.message
    assert "amqp.queue_idle_expiry_seconds" in refused.value.message


async def test_a_target_rabbitmq_refuses_to_declare_makes_its_messages_wait(amqp_url: str) -> None:
    # Not the messages' fault: an operator may fix the queue, and they may go then.
    queue, fine = unique_name("declared-otherwise"), unique_name("fine")
    async with publisher(amqp_url, queue_idle_expiry_seconds=60) as (bus, _):
        await aio.call(declare_plain, amqp_url, queue)
        outcomes = await bus.to_targets(
            [(("queue", queue), message("waits")), (("queue", fine), message("goes"))]
        )
        await aio.call(drain, amqp_url, queue)
        await aio.call(drain, amqp_url, fine)
    assert [o.status for o in outcomes] == ["unavailable", "confirmed"]
    assert isinstance(outcomes[0].error, FailedPrecondition)


async def test_a_name_pamqp_refuses_is_invalid_argument(amqp_url: str) -> None:
    async with publisher(amqp_url) as (bus, _):
        with pytest.raises(InvalidArgument):
            await aio.call(bus.publish_topic, "caf\u00e9", message("x"))


class FakeBroker:
    generation = 1


def test_the_declaration_cache_forgets_the_least_recently_used() -> None:
    broker: Any = FakeBroker()
    declared = Declared(broker)
    declared.add(("queue", "first"))
    for i in range(DECLARED_MAX - 1):
        declared.add(("queue", f"q{i}"))
    assert ("queue", "first") in declared  # used now: the most recent
    declared.add(("queue", "one more"))
    assert len(declared) == DECLARED_MAX
    assert ("queue", "q0") not in declared and ("queue", "first") in declared
    broker.generation = 2  # a reconnect forgets everything
    assert ("queue", "first") not in declared and len(declared) == 0


async def test_a_refusal_on_a_shared_channel_loses_no_other_message(amqp_url: str) -> None:
    # Another sender's refused message closes the one shared channel before this batch is read:
    # this batch's messages before its own refused one were dropped too, and must go again.
    queue = unique_name("shared")
    other: list[tuple[Target, Outgoing]] = [(("queue", queue), message("x", expires_at=NEVER))]
    batch: list[tuple[Target, Outgoing]] = [(("queue", queue), message(f"m{i}")) for i in range(6)]
    batch[3] = (("queue", queue), message("refused too", expires_at=NEVER))

    async def both(bus: Publisher) -> list[Any]:
        await bus.declare(queue)
        return await asyncio.gather(bus._publish_all(other), bus._publish_all(batch))

    async with publisher(amqp_url, publish_channels=1) as (bus, _):
        [refused], outcomes = await aio.call(both, bus)
        seen = await aio.call(drain, amqp_url, queue)
    assert refused.status == "refused"
    assert [o.status for o in outcomes] == ["confirmed"] * 3 + ["refused"] + ["confirmed"] * 2
    assert set(seen) == {f"m{i}" for i in (0, 1, 2, 4, 5)}  # at least once each


class StallingProxy:
    """(asyncio side) A TCP proxy in front of RabbitMQ that can stop reading what the client
    sends, as a broker that stops reading does: the client's socket and write queue fill up."""

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.reading.set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        broker_r, broker_w = await asyncio.open_connection("127.0.0.1", 5672)
        for pump in (self._pump(client_r, broker_w, True), self._pump(broker_r, client_w, False)):
            task = asyncio.ensure_future(pump)
            self._tasks.add(task)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, held: bool) -> None:
        while True:
            if held:
                await self.reading.wait()
            data = await r.read(65536)
            if not data:
                w.close()
                return
            w.write(data)
            await w.drain()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._server.close()


async def open_underlay(broker: Broker) -> aiormq.Channel:
    channel = await broker.connection.channel()
    return cast(aiormq.Channel, await channel.get_underlay_channel())


async def start_draining_publish(channel: aiormq.Channel, queue: str) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(channel.basic_publish(b"z", routing_key=queue))
    await asyncio.sleep(0.1)
    return task


async def test_a_bulk_publish_keeps_its_deadline_when_rabbitmq_stops_reading(
    amqp_url: str,
) -> None:
    queue = unique_name("stalled")
    proxy = StallingProxy()
    async with aio.open_loop(lambda: None):
        port = await aio.call(proxy.start)
        url = amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{port}")
        async with publisher(url, publish_channels=1, heartbeat_seconds=120) as (bus, broker):
            await bus.to_targets([(("queue", queue), message("declares the queue"))])
            other = await aio.call(open_underlay, broker)
            proxy.reading.clear()
            big = [(("queue", queue), message("x" * (1 << 20))) for _ in range(32)]
            with trio.fail_after(3 * PUBLISH_TIMEOUT):
                clog = await bus.to_targets(big)
            # A publish that waits for the socket to drain (as a consumer's ack does) stops
            # aiormq's writer: the connection's write queue of 10 frames fills up behind it.
            waiting = await aio.call(start_draining_publish, other, queue)
            outcomes: list[list[Outcome]] = []

            async def one() -> None:
                outcomes.append(await bus.to_targets([(("queue", queue), message("y"))]))

            try:
                with trio.fail_after(3 * PUBLISH_TIMEOUT):  # never later than its deadline
                    async with trio.open_nursery() as nursery:
                        for _ in range(15):  # past aiormq's write queue of 10 frames
                            nursery.start_soon(one)
            finally:
                proxy.reading.set()
                waiting.cancel()
        await aio.call(proxy.close)
        await aio.call(drain, amqp_url, queue)
    assert {o.status for o in clog} == {"unavailable"}
    assert {o.status for batch in outcomes for o in batch} == {"unavailable"}


async def test_a_declaration_whose_caller_leaves_fails_no_one_else(amqp_url: str) -> None:
    async with publisher(amqp_url) as (bus, _):
        queues = [unique_name("declared") for _ in range(60)]
        failures: list[str] = []

        async def declare(queue: str, patience: float) -> None:
            with trio.move_on_after(patience):
                try:
                    await bus.declare_queue(queue)
                except Exception as error:
                    failures.append(f"{queue}: {error}")

        async with trio.open_nursery() as nursery:
            for i, queue in enumerate(queues):  # every other caller gives up midway
                nursery.start_soon(declare, queue, 0.0005 * i if i % 2 else 30)
        assert failures == []


def test_a_channel_asked_of_a_connection_that_just_closed_is_unavailable() -> None:
    class ClosedConnection:
        """What aiormq does when the connection closed before its close callback ran."""

        def channel(self, **_: Any) -> Any:
            async def opening() -> None:
                raise RuntimeError("<Connection> closed")

            return opening()

    connection = cast(aio_pika.abc.AbstractConnection, ClosedConnection())
    with pytest.raises(Unavailable, match="opening a channel"):
        asyncio.run(open_channel(connection))
