"""The byte cap on a node's consumer buffers (amqp.buffer_max_bytes): the accounting and the
pause/resume decisions with fakes, then real RabbitMQ, in-process and through a daemon."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import trio

from eventbus import aio
from eventbus.broker import Channel
from eventbus.config import AmqpConfig
from eventbus.consumer import Buffer, Buffered, ByteBudget, Lane, QueueConsumer
from eventbus.metrics import Metrics
from eventbus.supervise import Supervisor
from tests.bus_client import BusClient
from tests.servers import unique_name
from tests.test_consumer import running_consumers

KIB = 1024
MIB = 1024 * KIB


def sized(name: str, size: int) -> Buffered:
    return Buffered(message=name, received_at=0.0, size=size)  # type: ignore[arg-type]


# --- ByteBudget and Buffer: plain accounting ---------------------------------------------------


def test_the_budget_is_full_at_the_cap_and_free_again_below_half_of_it() -> None:
    budget = ByteBudget(100)
    budget.add(60)
    assert not budget.full and budget.room == 40
    budget.add(40)
    assert budget.full and budget.room == 0
    budget.remove(40)
    assert budget.full  # 60 is not below half the cap
    budget.remove(11)
    assert not budget.full and budget.used == 49


def test_a_message_that_does_not_fit_is_refused_unless_its_queue_buffers_nothing() -> None:
    budget = ByteBudget(100)
    budget.add(90)
    assert budget.admits(10, alone=False)
    assert not budget.admits(11, alone=False)
    assert budget.admits(1000, alone=True)  # larger than the cap, and alone: never a stall
    budget.refused()
    assert budget.full


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


# --- QueueConsumer's pause and resume, with fakes of aio-pika ----------------------------------


@dataclass
class FakeMessage:
    body: bytes
    settled: list[str] = field(default_factory=list)

    async def nack(self, requeue: bool) -> None:
        self.settled.append("requeued" if requeue else "dropped")

    async def ack(self) -> None:
        self.settled.append("acked")


@dataclass
class FakeQueue:
    """What the consumer calls on an aio-pika queue: consume, cancel, get."""

    ready: list[FakeMessage] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    consumers: int = 0

    async def consume(self, _callback: Any) -> str:
        self.consumers += 1
        self.calls.append("consume")
        return f"tag{self.consumers}"

    async def cancel(self, tag: str) -> None:
        self.calls.append(f"cancel {tag}")

    async def get(self, *, no_ack: bool, fail: bool) -> FakeMessage | None:
        self.calls.append("get")
        return self.ready.pop(0) if self.ready else None


@dataclass
class FakeAmqpChannel:
    qos: list[int] = field(default_factory=list)
    is_closed: bool = False

    async def set_qos(self, *, prefetch_count: int) -> None:
        self.qos.append(prefetch_count)


def consumer_with(budget: ByteBudget, channels: int = 2, prefetch: int = 100) -> QueueConsumer:
    config = AmqpConfig(consumers_per_queue=channels, prefetch_count=prefetch)
    metrics = Metrics("test")

    async def declare(queue: str, *, again: bool = False) -> None:
        pass

    consumer = QueueConsumer(
        None,  # type: ignore[arg-type] # never reached: the lanes are given
        "q",
        config,
        metrics,
        Supervisor(metrics),
        declare,
        budget,
    )
    consumer._in_session = True
    return consumer


def fake_lanes(count: int) -> list[Lane]:
    return [
        Lane(Channel(FakeAmqpChannel(), 1), FakeQueue(), f"tag{i}")  # type: ignore[arg-type]
        for i in range(count)
    ]


async def test_arrivals_past_the_cap_go_back_to_rabbitmq_and_fill_the_budget() -> None:
    budget = ByteBudget(1000)
    consumer = consumer_with(budget)
    messages = [FakeMessage(b"x" * 400) for _ in range(4)]
    async with aio.open_loop(lambda: None):
        for message in messages:
            await aio.call(consumer._on_message, message)  # type: ignore[arg-type]
    assert [m.settled for m in messages] == [[], [], ["requeued"], ["requeued"]]
    assert consumer.buffer.bytes == budget.used == 800
    assert budget.full


async def test_a_message_larger_than_the_cap_is_buffered_when_its_queue_holds_nothing() -> None:
    budget = ByteBudget(1000)
    consumer, other = consumer_with(budget), consumer_with(budget)
    other.buffer.put(sized("elsewhere", 900))
    huge = FakeMessage(b"x" * 5000)
    async with aio.open_loop(lambda: None):
        await aio.call(consumer._on_message, huge)  # type: ignore[arg-type]
    assert huge.settled == [] and consumer.buffer.bytes == 5000


async def test_a_full_budget_cancels_every_consumer_and_fetches_only_for_waiting_takers() -> None:
    budget = ByteBudget(1000)
    consumer = consumer_with(budget)
    consumer.buffer.put(sized("held", 1000))
    lanes = fake_lanes(2)
    first: FakeQueue = lanes[0].queue  # type: ignore[assignment]
    first.ready.append(FakeMessage(b"fetched"))
    async with aio.open_loop(lambda: None):
        await consumer._follow_budget(lanes)
        assert [lane.tag for lane in lanes] == [None, None]
        assert first.calls == ["cancel tag0"]  # a message is buffered: nothing fetched
        await aio.call(consumer.buffer.take)  # the buffer is empty now, and then a taker waits
        waiting = asyncio.ensure_future(consumer.buffer.take())
        await trio.sleep(0.01)
        budget.refused()  # full again (another queue's messages, say)
        await consumer._follow_budget(lanes)
        got = await aio.call(lambda: waiting)
    assert first.calls == ["cancel tag0", "get"]
    assert got.message.body == b"fetched"


async def test_a_budget_with_room_again_consumes_with_a_prefetch_that_fits_it() -> None:
    budget = ByteBudget(1000)
    consumer = consumer_with(budget, channels=2, prefetch=100)
    async with aio.open_loop(lambda: None):
        await aio.call(consumer._on_message, FakeMessage(b"x" * 50))  # type: ignore[arg-type]
    budget.add(700)  # another queue holds 700: room for 250, 2 channels of 50-byte messages
    lanes = fake_lanes(2)
    for lane in lanes:
        lane.tag = None
    async with aio.open_loop(lambda: None):
        await consumer._follow_budget(lanes)
    assert [lane.tag for lane in lanes] == ["tag1", "tag1"]
    assert [lane.channel.amqp.qos for lane in lanes] == [[2], [2]]  # type: ignore[attr-defined]


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


async def test_buffered_bytes_stay_within_the_cap_plus_one_message(amqp_url: str) -> None:
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
        got = []
        with trio.fail_after(60):
            for _ in range(count + 1):
                item = await aio.call(consumers.take, queue)
                got.append(item.message.body)
                assert await aio.call(item.settle, ack=True)
                if len(got) == 5:
                    await trio.sleep(1)  # the buffer fills to the cap meanwhile
                    waiting = await aio.call(ready_in, amqp_url, queue)
        assert most <= cap + size
        assert most >= cap // 2  # it did fill up (the prefetch fits the cap, less what is in hand)
        assert waiting > 0  # the rest stayed in RabbitMQ rather than in flight to the node
        assert sorted(got) == sorted(bodies)  # each exactly once, the huge one included
        assert consumers.buffered_bytes() == {queue: 0}
        assert await aio.call(ready_in, amqp_url, queue) == 0


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
