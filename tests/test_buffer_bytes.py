"""The byte cap on a node's consumer buffers (amqp.buffer_max_bytes): the accounting, parking and
the prefetch with fakes, then real RabbitMQ, in-process and through a daemon."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
import trio

from eventbus.backends import aio, broker
from eventbus.config import AmqpConfig
from eventbus.delivery import consumer
from eventbus.delivery.consumer import (
    Buffer,
    Buffered,
    ByteBudget,
    QueueConsumer,
    close_after_failed_call,
)
from eventbus.ops.metrics import Metrics
from eventbus.ops.supervise import Supervisor
from tests.bus_client import BusClient
from tests.servers import unique_name
from tests.test_consumer import running_consumers

KIB = 1024
MIB = 1024 * KIB


def sized(name: str, size: int) -> Buffered:
    return Buffered(message=name, received_at=0.0, size=size)  # type: ignore[arg-type]


# --- ByteBudget and Buffer: plain accounting ---------------------------------------------------


def test_a_message_that_does_not_fit_is_refused_unless_its_queue_buffers_nothing() -> None:
    budget = ByteBudget(100)
    budget.add(90)
    assert budget.room == 10
    assert budget.admits(10, alone=False)
    assert not budget.admits(11, alone=False)
    assert budget.admits(1000, alone=True)  # larger than the cap, and alone: never a stall
    budget.add(1000)
    assert budget.room == 0


def test_buffers_count_their_bytes_in_the_shared_budget() -> None:
    async def scenario() -> list[tuple[int, int, int]]:
        budget = ByteBudget(1000)
        a, b = Buffer(budget), Buffer(budget)
        seen = []
        a.put(sized("a1", 100))
        a.put(sized("a2", 200))
        b.put(sized("b1", 50))
        seen.append((a.bytes, b.bytes, budget.used))
        taken = await a.take()
        seen.append((a.bytes, b.bytes, budget.used))
        a.put_back(taken)
        assert [str(i.message) for i in a.take_older_than(1.0)] == ["a1", "a2"]
        seen.append((a.bytes, b.bytes, budget.used))
        b.clear()
        seen.append((a.bytes, b.bytes, budget.used))
        return seen

    assert asyncio.run(scenario()) == [(300, 50, 350), (200, 50, 250), (0, 50, 50), (0, 0, 0)]


def test_a_message_handed_straight_to_a_waiting_taker_is_not_counted() -> None:
    async def scenario() -> tuple[int, int]:
        budget = ByteBudget(1000)
        buffer = Buffer(budget)
        taker = asyncio.create_task(buffer.take())
        await asyncio.sleep(0)
        buffer.put(sized("straight", 400))
        await taker
        return buffer.bytes, budget.used

    assert asyncio.run(scenario()) == (0, 0)


# --- QueueConsumer's parking and prefetch, with fakes of aio-pika ------------------------------


@dataclass
class FakeChannel:
    """An aiormq channel: what parked deliveries are handed back through."""

    nacked: list[int] = field(default_factory=list)

    async def basic_nack(self, delivery_tag: int, *, requeue: bool) -> None:
        assert requeue
        self.nacked.append(delivery_tag)


@dataclass
class FakeMessage:
    body: bytes
    delivery_tag: int = 1
    channel: FakeChannel = field(default_factory=FakeChannel)
    settled: list[str] = field(default_factory=list)

    async def nack(self, requeue: bool) -> None:
        self.settled.append("requeued" if requeue else "dropped")

    async def ack(self) -> None:
        self.settled.append("acked")


def consumer_with(budget: ByteBudget, channels: int = 2, prefetch: int = 100) -> QueueConsumer:
    config = AmqpConfig(consumers_per_queue=channels, prefetch_count=prefetch)
    metrics = Metrics("test")

    async def declare(queue: str, *, again: bool = False) -> None:
        pass

    queue_consumer = QueueConsumer(
        None,  # type: ignore[arg-type] # never reached: no session is run
        "q",
        config,
        metrics,
        Supervisor(metrics),
        declare,
        budget,
    )
    queue_consumer._in_session = True
    return queue_consumer


async def arrive(queue_consumer: QueueConsumer, messages: list[FakeMessage]) -> None:
    async with aio.open_loop(lambda: None):
        for message in messages:
            await aio.call(queue_consumer._on_message, message)  # type: ignore[arg-type]


async def test_arrivals_past_the_cap_are_parked_without_their_bodies() -> None:
    budget = ByteBudget(1000)
    queue_consumer = consumer_with(budget)
    channel = FakeChannel()
    messages = [FakeMessage(b"x" * 400, tag, channel) for tag in range(1, 5)]
    await arrive(queue_consumer, messages)
    assert queue_consumer.buffer.bytes == budget.used == 800
    assert [(p.delivery_tag, p.size) for p in queue_consumer._parked] == [(3, 400), (4, 400)]
    assert [m.settled for m in messages] == [[], [], [], []]  # nothing handed back yet
    assert channel.nacked == []
    parked = weakref.ref(messages[3])
    del messages
    gc.collect()
    assert parked() is None  # nothing holds a parked message, nor its body


async def test_a_message_larger_than_the_cap_is_buffered_when_its_queue_holds_nothing() -> None:
    budget = ByteBudget(1000)
    queue_consumer, other = consumer_with(budget), consumer_with(budget)
    other.buffer.put(sized("elsewhere", 900))
    huge = FakeMessage(b"x" * 5000)
    await arrive(queue_consumer, [huge])
    assert huge.settled == [] and queue_consumer.buffer.bytes == 5000
    assert not queue_consumer._parked


async def test_parked_deliveries_go_back_once_they_fit_or_their_queue_buffers_nothing() -> None:
    budget = ByteBudget(1000)
    queue_consumer, other = consumer_with(budget), consumer_with(budget)
    other.buffer.put(sized("elsewhere", 600))
    channel = FakeChannel()
    await arrive(queue_consumer, [FakeMessage(b"x" * 300, tag, channel) for tag in range(1, 5)])
    assert [p.delivery_tag for p in queue_consumer._parked] == [2, 3, 4]  # 1 came alone
    assert queue_consumer._unpark(cutoff=0.0) == []  # room for 100 bytes: none fits
    other.buffer.clear()  # room for 700: two fit, in order
    assert [p.delivery_tag for p in queue_consumer._unpark(cutoff=0.0)] == [2, 3]
    queue_consumer.buffer.clear()
    budget.add(1000)  # no room at all, but the queue's buffer is empty: one comes back alone
    leaving = queue_consumer._unpark(cutoff=0.0)
    assert [p.delivery_tag for p in leaving] == [4]
    async with aio.open_loop(lambda: None):
        await aio.call(consumer.give_back, leaving)
    assert channel.nacked == [4]


async def test_a_delivery_parked_for_the_hold_time_goes_back_even_without_room() -> None:
    budget = ByteBudget(1000)
    queue_consumer = consumer_with(budget)
    await arrive(queue_consumer, [FakeMessage(b"x" * 600, tag) for tag in (1, 2)])
    assert queue_consumer._unpark(cutoff=0.0) == []
    assert [p.delivery_tag for p in queue_consumer._unpark(cutoff=float("inf"))] == [2]


async def test_the_prefetch_fits_the_room_for_the_typical_size_within_the_configured_share() -> (
    None
):
    budget = ByteBudget(1000 * KIB)
    queue_consumer = consumer_with(budget, channels=2, prefetch=100)
    assert queue_consumer._prefetch() == 1  # sizes unknown: 1 MiB assumed
    await arrive(queue_consumer, [FakeMessage(b"x" * 50 * KIB)])
    budget.add(750 * KIB)  # another queue holds 750 KiB: 200 KiB left, 2 channels of 50 KiB
    assert queue_consumer._prefetch() == 2
    budget.remove(800 * KIB)
    assert queue_consumer._prefetch() == 10
    queue_consumer._typical_size = 10
    assert queue_consumer._prefetch() == 50  # small messages: the configured share


async def test_freed_room_goes_back_once_across_all_queues_oldest_first() -> None:
    budget = ByteBudget(2000)
    budget.add(1500)  # another queue's buffer
    queues = [consumer_with(budget) for _ in range(5)]
    for queue_consumer in queues:  # each buffers 100 bytes, filling the budget
        await arrive(queue_consumer, [FakeMessage(b"x" * 100, 1)])
    for queue_consumer in queues:  # then parks two of 300
        await arrive(queue_consumer, [FakeMessage(b"x" * 300, tag) for tag in (2, 3)])
    assert [len(q._parked) for q in queues] == [2] * 5
    budget.remove(700)  # room for two of them, not for one each
    assert [q._share._woken.is_set() for q in queues] == [True, False, False, False, False]
    leaving = [[p.delivery_tag for p in q._unpark(cutoff=0.0)] for q in queues]
    assert leaving == [[2, 3], [], [], [], []]  # the node's two oldest, nothing else
    assert budget.room == 100  # their bytes are kept for their return
    # A fresh delivery does not take the room kept for them; their return does.
    await arrive(queues[1], [FakeMessage(b"x" * 300, 4)])
    assert [p.delivery_tag for p in queues[1]._parked] == [2, 3, 4]
    await arrive(queues[0], [FakeMessage(b"x" * 300, tag) for tag in (4, 5)])
    assert queues[0].buffer.bytes == 700 and not queues[0]._parked
    assert [[p.delivery_tag for p in q._unpark(cutoff=0.0)] for q in queues] == [[]] * 5


async def test_room_kept_for_a_delivery_that_never_comes_back_lapses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    budget = ByteBudget(1000)
    budget.add(900)
    queue_consumer = consumer_with(budget)
    await arrive(queue_consumer, [FakeMessage(b"x" * 50, 1), FakeMessage(b"x" * 300, 2)])
    monkeypatch.setattr(consumer, "RESERVE_SECONDS", 0.0)  # RabbitMQ sent it elsewhere
    budget.remove(900)
    assert [p.delivery_tag for p in queue_consumer._unpark(cutoff=0.0)] == [2]
    assert budget.room == 950


async def test_a_session_that_ends_lets_go_of_the_room_kept_for_it() -> None:
    budget = ByteBudget(1000)
    budget.add(900)
    queue_consumer = consumer_with(budget)
    await arrive(queue_consumer, [FakeMessage(b"x" * 50, 1), FakeMessage(b"x" * 300, 2)])
    budget.remove(900)
    assert budget.room == 650  # kept for delivery 2
    budget.forget(queue_consumer._share)  # its channels close: RabbitMQ requeues it
    assert budget.room == 950 and queue_consumer._unpark(cutoff=0.0) == []


async def test_a_delivery_larger_than_the_cap_does_not_hold_up_the_others() -> None:
    budget = ByteBudget(1000)
    budget.add(900)
    huge_queue, small_queue = consumer_with(budget), consumer_with(budget)
    await arrive(huge_queue, [FakeMessage(b"x" * 50, 1), FakeMessage(b"x" * 5000, 2)])
    await arrive(small_queue, [FakeMessage(b"x" * 40, 1), FakeMessage(b"x" * 200, 2)])
    budget.remove(900)
    assert huge_queue._unpark(cutoff=0.0) == []  # only alone, or after the hold time
    assert [p.delivery_tag for p in small_queue._unpark(cutoff=0.0)] == [2]


async def test_sessions_opening_together_commit_no_more_than_the_budget() -> None:
    # 20 queues of 3 channels opening at once, each alone would take 60 per channel.
    budget = ByteBudget(64 * MIB)
    queues = [consumer_with(budget, channels=3, prefetch=180) for _ in range(20)]
    prefetches = [[q._commit_prefetch() for _ in range(3)] for q in queues]
    assert prefetches[0] == [21, 21, 21]  # 63 MiB of 1 MiB messages
    assert prefetches[1:] == [[1, 1, 1]] * 19  # the rest: one each, never less
    committed = sum(q._share.outstanding for q in queues)
    assert committed <= 64 * MIB + 20 * 3 * MIB
    budget.forget(queues[0]._share)  # its session ended
    later = consumer_with(budget, channels=3, prefetch=180)
    assert later._commit_prefetch() == 2  # 7 MiB: the others' prefetch may still bring 57
    queues[1].buffer.put(sized("m", 3 * MIB))  # what is buffered is not counted twice
    assert budget.prefetch_room(later._share) == budget.room - 18 * 3 * MIB
    await arrive(queues[2], [FakeMessage(b"x" * KIB)])  # its messages prove small
    assert budget.prefetch_room(later._share) == budget.room - 17 * 3 * MIB - 2 * KIB


# --- Real RabbitMQ ------------------------------------------------------------------------------


async def publish_bodies(amqp_url: str, queue: str, bodies: list[bytes]) -> None:
    """(asyncio side) Declare queue durable and publish bodies to it, confirmed."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        for body in bodies:
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


async def ready_in(amqp_url: str, queue: str) -> int:
    """(asyncio side) Messages of queue waiting in RabbitMQ, not delivered to any consumer."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


def body(number: int, size: int) -> bytes:
    return number.to_bytes(4, "big") * (size // 4)


@pytest.mark.parametrize("assumed_size", [MIB, KIB], ids=["prefetch-fits", "parking"])
async def test_buffered_bytes_stay_within_the_cap_plus_one_message(
    amqp_url: str, assumed_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Assuming 1 KiB messages, the first session prefetches them all and parks most.
    monkeypatch.setattr(consumer, "ASSUMED_SIZE", assumed_size)
    cap, size, count = 2 * MIB, 256 * KIB, 40
    queue = unique_name("big")
    config = AmqpConfig(url=amqp_url, consumers_per_queue=2, buffer_max_bytes=cap)
    huge = b"h" * (3 * MIB)  # larger than the cap on its own
    bodies = [body(i, size) for i in range(count)] + [huge]
    async with running_consumers(config) as running:
        await aio.call(publish_bodies, amqp_url, queue, bodies)
        consumers = running.consumers
        most = 0
        record = consumers._budget.add

        def add(size: int) -> None:
            nonlocal most
            record(size)
            most = max(most, consumers._budget.used)

        consumers._budget.add = add  # type: ignore[method-assign]
        got, parked = [], 0
        with trio.fail_after(60):
            for _ in range(count + 1):
                item = await aio.call(consumers.take, queue)
                got.append(item.message.body)
                assert await aio.call(item.settle, ack=True)
                if len(got) == 5:
                    await trio.sleep(1)  # the buffer fills meanwhile
                    waiting = await aio.call(ready_in, amqp_url, queue)
                    parked = len(consumers._running[queue]._parked)
        assert most <= max(cap, len(huge))  # at most the cap, or one message alone
        assert sorted(got) == sorted(bodies)  # each exactly once, the huge one included
        assert consumers.buffered_bytes() == {queue: 0}
        assert await aio.call(ready_in, amqp_url, queue) == 0
    if assumed_size == KIB:
        assert most >= cap - size and parked > 0  # filled up; the rest waited parked
    else:
        assert parked == 0 and waiting > 0  # the rest stayed in RabbitMQ, not in flight


async def consume_into_nothing(channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    """(asyncio side) Consume queue on channel, leaving every delivery unacked."""

    async def ignore(_message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pass

    declared = await channel.get_queue(queue, ensure=False)
    await declared.consume(ignore)


async def fail_a_call(channel: aio_pika.abc.AbstractChannel) -> None:
    """(asyncio side) A call on channel that times out before RabbitMQ can answer."""
    underlay = await channel.get_underlay_channel()
    with contextlib.suppress(TimeoutError):
        await underlay.basic_qos(prefetch_count=1, timeout=0.0001)


async def test_a_consuming_channel_closed_after_a_failed_call_leaves_the_connection_working(
    amqp_url: str,
) -> None:
    # aiormq sends Channel.Close itself after the failed call; closing the channel before the
    # Close-Ok would block the connection's reader behind the deliveries still arriving.
    queue = unique_name("inflight")
    config = AmqpConfig(url=amqp_url)
    async with aio.open_loop(lambda: None), trio.open_nursery() as nursery:
        await aio.call(publish_bodies, amqp_url, queue, [body(i, 256 * KIB) for i in range(100)])
        bus_broker = await nursery.start(broker.run, config, Metrics("test"))
        channel = await bus_broker.channel(prefetch=100)
        await aio.call(consume_into_nothing, channel.amqp, queue)
        await trio.sleep(0.05)
        await aio.call(fail_a_call, channel.amqp)
        await close_after_failed_call(channel)
        with trio.fail_after(10):
            other = await bus_broker.channel()
            await aio.call(other.amqp.declare_queue, queue, durable=True)
            await other.close()
        nursery.cancel_scope.cancel()


def test_a_daemon_delivers_every_large_message_once_under_a_small_cap(make_daemon: Any) -> None:
    daemon = make_daemon(amqp={"buffer_max_bytes": 2 * MIB, "consumers_per_queue": 2})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("large")
    try:
        sent = [f"{i:04d}".ljust(256 * KIB, "x") for i in range(30)] + ["H" * (3 * MIB)]
        for data in sent:
            client.publish(queue, data)
        received = []
        for _ in sent:
            reply = client.subscribe(queue, timeout=30)
            received.append(reply.data)
            client.ack(reply.id)
        assert sorted(received) == sorted(sent)
        assert client.try_subscribe(queue, timeout=2) is None  # nothing twice
        status, metrics = daemon.http_get("/metrics")
        assert status == 200 and f'eventbus_buffered_bytes{{queue="{queue}"}}' in metrics
    finally:
        client.close()
