"""A queue consumer against the real RabbitMQ, in-process, for races a daemon test cannot time."""

from __future__ import annotations

from typing import Any

import aio_pika
import pytest
import trio

from eventbus import aio, broker
from eventbus.config import AmqpConfig
from eventbus.consumer import QueueConsumer
from eventbus.metrics import Metrics
from tests.servers import unique_name


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
        consumer = QueueConsumer(bus_broker, queue, config, Metrics("test"))
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
