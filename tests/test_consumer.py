"""A queue consumer against the real RabbitMQ, in-process, for races a daemon test cannot time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
import trio

from eventbus.backends import aio, broker
from eventbus.config import AmqpConfig
from eventbus.delivery.consumer import Buffer, Consumers, Declare, QueueConsumer
from eventbus.delivery.publisher import Publisher
from eventbus.errors import FailedPrecondition, NotFound, ResourceExhausted
from eventbus.ops.metrics import Metrics, label_values
from eventbus.ops.supervise import Supervisor
from tests.servers import unique_name


def declarer(bus_broker: broker.Broker, config: AmqpConfig) -> Declare:
    return Publisher(bus_broker, config).declare_queue


async def delete_and_publish_again(amqp_url: str, queue: str, body: bytes | None) -> None:
    """(asyncio side) Delete queue behind the consumer; then, given a body, declare it again
    and publish body to it."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        if body is not None:
            await channel.declare_queue(queue, durable=True)
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


@pytest.mark.parametrize("deleted_after_channel", [1, 3])
async def test_a_queue_deleted_while_its_consumers_start_is_consumed_again(
    amqp_url: str, deleted_after_channel: int
) -> None:
    queue = unique_name("deleted")
    config = AmqpConfig(url=amqp_url, consumers_per_queue=3, prefetch_count=30)
    async with aio.open_loop(lambda: None), trio.open_nursery() as nursery:
        bus_broker = await nursery.start(broker.run, config, Metrics("test"))
        metrics = Metrics("test")
        consumer = QueueConsumer(
            bus_broker, queue, config, metrics, Supervisor(metrics), declarer(bus_broker, config)
        )
        set_up = 0
        consume_on_new_channel = consumer._consume_on_new_channel

        async def then_delete_the_queue() -> Any:
            # The broker cancels the consumers set up so far, while the session still starts.
            nonlocal set_up
            channel = await consume_on_new_channel()
            set_up += 1
            if set_up == deleted_after_channel:
                await aio.call(delete_and_publish_again, amqp_url, queue, None)
            return channel

        consumer._consume_on_new_channel = then_delete_the_queue  # type: ignore[method-assign]
        nursery.start_soon(consumer.run)
        await trio.sleep(1)
        await aio.call(delete_and_publish_again, amqp_url, queue, b"after")
        with trio.fail_after(10):
            item = await aio.call(consumer.take)
        assert item.message.body == b"after"
        nursery.cancel_scope.cancel()


async def declare_with_max_length(amqp_url: str, queue: str) -> None:
    """(asyncio side) Declare queue with arguments the bus does not use."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-max-length": 10})


async def publish(amqp_url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)


@dataclass
class Running:
    """A connected broker and a node's Consumers, in-process."""

    broker: broker.Broker
    declare: Declare
    consumers: Consumers
    metrics: Metrics
    nursery: trio.Nursery


@asynccontextmanager
async def running_consumers(
    config: AmqpConfig, *, auto_create_queues: bool = True
) -> AsyncIterator[Running]:
    metrics = Metrics("test")
    async with aio.open_loop(lambda: None), trio.open_nursery() as nursery:
        bus_broker = await nursery.start(broker.run, config, metrics)
        publisher = Publisher(bus_broker, config, auto_create_queues=auto_create_queues)
        declare = publisher.declare_queue
        consumers = Consumers(bus_broker, config, metrics, Supervisor(metrics), declare, nursery)
        yield Running(bus_broker, declare, consumers, metrics, nursery)
        nursery.cancel_scope.cancel()


async def test_a_queue_rabbitmq_refuses_is_answered_failed_precondition_at_once(
    amqp_url: str,
) -> None:
    queue = unique_name("other_args")
    async with running_consumers(AmqpConfig(url=amqp_url, consumers_per_queue=2)) as running:
        await aio.call(declare_with_max_length, amqp_url, queue)
        for _ in range(2):  # the second is answered from memory of the first
            with trio.fail_after(5), pytest.raises(FailedPrecondition, match=queue):
                await aio.call(running.consumers.take, queue)
        assert running.consumers.running() == []


async def test_consumed_queues_are_capped_and_an_idle_one_makes_room(amqp_url: str) -> None:
    config = AmqpConfig(url=amqp_url, consumers_per_queue=1, max_consumed_queues=2)
    a, b, c = (unique_name(name) for name in "abc")
    async with running_consumers(config) as running:
        consumers = running.consumers
        waiting_on_a = trio.CancelScope()

        async def wait_on_a() -> None:
            with waiting_on_a:
                await aio.call(consumers.take, a)

        running.nursery.start_soon(wait_on_a)
        running.nursery.start_soon(aio.call, consumers.take, b)
        await trio.sleep(1)
        with pytest.raises(ResourceExhausted, match=r"amqp\.max_consumed_queues"):
            await aio.call(consumers.take, c)
        waiting_on_a.cancel()  # nobody waits on a any more: it makes room for c
        await trio.sleep(0.5)
        await aio.call(publish, amqp_url, c, b"to c")
        with trio.fail_after(10):
            item = await aio.call(consumers.take, c)
        assert item.message.body == b"to c"
        assert sorted(q.queue for q in consumers.running()) == sorted([b, c])


async def test_a_consumer_that_fails_unexpectedly_is_counted_and_started_again(
    amqp_url: str,
) -> None:
    queue = unique_name("flaky")
    config = AmqpConfig(url=amqp_url, consumers_per_queue=1)
    async with running_consumers(config) as running:
        metrics = running.metrics
        consumer = QueueConsumer(
            running.broker, queue, config, metrics, Supervisor(metrics), running.declare
        )
        consume_on_new_channel = consumer._consume_on_new_channel
        failures = [ValueError("a bug")]

        async def fail_once() -> Any:
            if failures:
                raise failures.pop()
            return await consume_on_new_channel()

        consumer._consume_on_new_channel = fail_once  # type: ignore[method-assign]
        running.nursery.start_soon(consumer.run)
        await aio.call(publish, amqp_url, queue, b"after the failure")
        with trio.fail_after(10):
            item = await aio.call(consumer.take)
        assert item.message.body == b"after the failure"
        assert label_values(metrics.task_failures) == {"consumer": 1}


async def test_a_missing_queue_the_bus_may_not_create_is_not_found_at_once(amqp_url: str) -> None:
    config = AmqpConfig(url=amqp_url, consumers_per_queue=1)
    async with running_consumers(config, auto_create_queues=False) as running:
        with trio.fail_after(5), pytest.raises(NotFound, match="auto_create_queues"):
            await aio.call(running.consumers.take, unique_name("missing"))


async def test_a_queue_with_a_hand_out_in_progress_is_not_retired(amqp_url: str) -> None:
    config = AmqpConfig(url=amqp_url, consumers_per_queue=1, max_consumed_queues=1)
    a, b = unique_name("a"), unique_name("b")
    async with running_consumers(config) as running:
        await aio.call(publish, amqp_url, a, b"being handed out")
        with trio.fail_after(10):
            taken = await aio.call(running.consumers.take, a)  # its record is being written
        with pytest.raises(ResourceExhausted):
            await aio.call(running.consumers.take, b)
        assert await aio.call(taken.settle, ack=True)  # settled on its own channel
        await aio.call(publish, amqp_url, b, b"to b")
        with trio.fail_after(10):
            item = await aio.call(running.consumers.take, b)
        assert item.message.body == b"to b"


async def test_a_paused_consumer_is_retired_at_once(amqp_url: str) -> None:
    config = AmqpConfig(url=amqp_url, consumers_per_queue=1, max_consumed_queues=1)
    a, b = unique_name("a"), unique_name("b")
    async with running_consumers(config) as running:
        with trio.move_on_after(0.5):
            await aio.call(running.consumers.take, a)
        paused = running.consumers.get(a)
        assert paused is not None
        paused.release("handed to another node", pause=60)
        await trio.sleep(0.5)
        await aio.call(publish, amqp_url, b, b"to b")
        with trio.fail_after(3):
            item = await aio.call(running.consumers.take, b)
        assert item.message.body == b"to b"
        assert paused.stopped


def test_takers_that_give_up_leave_nothing_behind() -> None:
    async def give_up_many_times() -> int:
        buffer = Buffer()
        for _ in range(1000):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0):
                    await buffer.take()
        return len(buffer._waiters)

    assert asyncio.run(give_up_many_times()) == 0
