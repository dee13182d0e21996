"""A publishing channel RabbitMQ nacked on is replaced, against the real RabbitMQ.

On a cluster, RabbitMQ 3.10 can nack every publish of a channel to a quorum queue whose leader
was on a node down when the channel first published to it, until that node is back (the
channel never looks for the new leader): the pool must not keep such a channel. Here a queue
that refuses messages when full (x-overflow reject-publish) makes RabbitMQ nack one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq
from pamqp.commands import Basic

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.config import AmqpConfig
from eventbus.delivery import bulk
from eventbus.delivery.channels import ChannelPool
from tests.servers import unique_name


def publish(queue: str, body: bytes) -> bulk.Publish:
    return bulk.Publish("", queue, True, body, Basic.Properties(message_id=body.decode()))


async def confirm(channel: aiormq.Channel, queue: str, body: bytes) -> Any:
    (confirmation,) = await bulk.send(channel, [publish(queue, body)])
    try:
        return await asyncio.wait_for(confirmation, 5)
    except aiormq.exceptions.DeliveryError as error:
        return error.frame


async def nack_one(pool: ChannelPool, full: str, roomy: str) -> dict[str, Any]:
    """(asyncio side) Fill `full`, have one more publish to it nacked, then publish to roomy."""
    before = await pool.channels()
    seen: dict[str, Any] = {"first": await confirm(before[0], full, b"fits")}
    seen["refused"] = await confirm(before[0], full, b"one too many")
    seen["nacked"] = bulk.nacked(before[0])
    seen["other kept"] = not bulk.nacked(before[1])
    after = await pool.channels()
    seen["replaced"] = after[0] is not before[0]
    seen["same other"] = after[1] is before[1]
    seen["again"] = await confirm(after[0], roomy, b"fresh channel")
    await asyncio.sleep(0.2)
    seen["still"] = await pool.channels()
    seen["after"] = after
    return seen


async def declare(pool: ChannelPool, full: str, roomy: str) -> None:
    (channel, _) = await pool.channels()
    arguments: dict[str, Any] = {"x-max-length": 1, "x-overflow": "reject-publish"}
    await channel.queue_declare(full, durable=True, arguments=arguments)
    await channel.queue_declare(roomy, durable=True)


async def delete(pool: ChannelPool, *queues: str) -> None:
    for queue in queues:
        await (await pool.channels())[1].queue_delete(queue)


async def test_a_channel_rabbitmq_nacked_on_is_replaced_the_others_kept(amqp_url: str) -> None:
    full, roomy = unique_name("full"), unique_name("roomy")
    config = AmqpConfig(url=amqp_url, namespace=unique_name("ns"), publish_channels=2)
    async with aio.open_loop(lambda: None):
        broker = Broker(config)
        await broker.connect(10)
        try:
            pool = ChannelPool(broker, 2)
            await aio.call(declare, pool, full, roomy)
            seen = await aio.call(nack_one, pool, full, roomy)
            await aio.call(delete, pool, full, roomy)
        finally:
            await broker.close()
    assert isinstance(seen["first"], Basic.Ack)
    assert isinstance(seen["refused"], Basic.Nack)
    assert seen["nacked"] and seen["other kept"]
    assert seen["replaced"] and seen["same other"]
    assert isinstance(seen["again"], Basic.Ack)
    assert seen["still"] == seen["after"]  # a channel that was never nacked is kept
