"""RabbitMQ's 404 for a queue that exists but is out of reach (the node of a classic queue down,
say) is UNAVAILABLE, never NOT_FOUND: a client takes NOT_FOUND as final and drops the message.
A queue that does not exist stays NOT_FOUND (checked against the real RabbitMQ)."""

from __future__ import annotations

import aio_pika
import aiormq.exceptions
import pytest

from eventbus.backends import aio
from eventbus.delivery.channels import bounded, queue_absent
from eventbus.errors import NotFound, Unavailable
from tests.servers import unique_name

# The reply texts of RabbitMQ 3.10's rabbit_amqqueue:absent/2, one per reason.
ABSENT = [
    "NOT_FOUND - home node 'rabbit@b' of durable queue 'orders' in vhost '/' is down or "
    "inaccessible",
    "NOT_FOUND - queue 'orders' in vhost '/' process is stopped by supervisor",
    "NOT_FOUND - queue 'orders' in vhost '/' has crashed and failed to restart",
    "NOT_FOUND - failed to perform operation on queue 'orders' in vhost '/' due to timeout",
    "NOT_FOUND - failed to perform operation on queue 'orders' in vhost '/': its master replica "
    "<11402.1107.0> may be stopping or being demoted",
]
MISSING = "NOT_FOUND - no queue 'orders' in vhost '/'"


async def refused(text: str) -> None:
    raise aiormq.exceptions.ChannelNotFoundEntity(text)


@pytest.mark.parametrize("text", ABSENT)
async def test_a_queue_out_of_reach_is_unavailable(text: str) -> None:
    assert queue_absent(aiormq.exceptions.ChannelNotFoundEntity(text))
    async with aio.open_loop(lambda: None):
        with pytest.raises(Unavailable, match="declaring queue 'orders'"):
            await aio.call(bounded, "declaring queue 'orders'", refused(text))


async def test_a_missing_queue_is_still_not_found() -> None:
    assert not queue_absent(aiormq.exceptions.ChannelNotFoundEntity(MISSING))
    async with aio.open_loop(lambda: None):
        with pytest.raises(NotFound, match="no queue"):
            await aio.call(bounded, "declaring queue 'orders'", refused(MISSING))


async def test_a_queue_rabbitmq_does_not_have_is_not_found(amqp_url: str) -> None:
    queue = unique_name("absent")

    async def look_up() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await bounded("looking up", channel.declare_queue(queue, passive=True))

    async with aio.open_loop(lambda: None):
        with pytest.raises(NotFound, match=f"no queue '{queue}'"):
            await aio.call(look_up)
