"""Publishing with publisher confirms: channel pools per target, queues declared once.

Every publish waits for RabbitMQ's confirm (or a return, for an unroutable message) under a
deadline, so a broken connection turns into Unavailable within seconds, never a hang.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import aio_pika
import aiormq.exceptions
import trio

from . import aio
from .broker import BROKER_ERRORS, Broker, Channel
from .errors import FailedPrecondition, Unavailable
from .retry import describe

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 5.0


class ChannelPool:
    """A few confirm channels used round robin; rebuilt after a reconnect."""

    def __init__(self, broker: Broker, size: int) -> None:
        self._broker = broker
        self._size = size
        self._channels: list[Channel] = []
        self._turn: Iterator[int] = itertools.count()
        self._lock = trio.Lock()

    async def get(self) -> Channel:
        live = [c for c in self._channels if _usable(c, self._broker.generation)]
        if len(live) < self._size:
            async with self._lock:
                live = [c for c in self._channels if _usable(c, self._broker.generation)]
                while len(live) < self._size:
                    live.append(await self._broker.channel(confirms=True))
                self._channels = live
        return live[next(self._turn) % len(live)]


def _usable(channel: Channel, generation: int) -> bool:
    return channel.generation == generation and not channel.amqp.is_closed


class Publisher:
    """Confirmed publishing to queues and exchanges, with declarations cached."""

    def __init__(self, broker: Broker, producers_per_queue: int) -> None:
        self._broker = broker
        self._producers = producers_per_queue
        self._pools: dict[str, ChannelPool] = {}
        self._declared: set[tuple[str, str]] = set()
        self._declared_generation = 0

    def _pool(self, target: str) -> ChannelPool:
        pool = self._pools.get(target)
        if pool is None:
            pool = self._pools[target] = ChannelPool(self._broker, self._producers)
        return pool

    async def channel_for(self, target: str) -> Channel:
        """A confirm channel from target's pool."""
        return await self._pool(target).get()

    async def declare_queue(self, queue: str) -> None:
        """Declare a durable queue once per connection."""
        if self._declared_generation != self._broker.generation:
            self._declared.clear()  # a reconnect: the broker may have lost what it had
            self._declared_generation = self._broker.generation
        if ("queue", queue) in self._declared:
            return
        channel = await self._pool(queue).get()
        await _guard(f"declaring queue {queue!r}", channel.amqp.declare_queue, queue, durable=True)
        self._declared.add(("queue", queue))

    async def to_queue(self, queue: str, message: aio_pika.Message) -> None:
        """Publish to a queue (declared if needed) and wait for the confirm."""
        await self.declare_queue(queue)
        channel = await self._pool(queue).get()
        try:
            await self._confirm(channel, "", queue, message)
        except aio_pika.exceptions.PublishError:
            # Unroutable: the queue was deleted behind our back. Declare it again, once.
            self._declared.discard(("queue", queue))
            await self.declare_queue(queue)
            await self._confirm(channel, "", queue, message)

    async def to_queues(self, messages: Sequence[tuple[str, aio_pika.Message]]) -> None:
        """Publish many (queue, message) pairs concurrently; returns once all are confirmed."""
        async with trio.open_nursery() as nursery:
            for queue, message in messages:
                nursery.start_soon(self.to_queue, queue, message)

    async def _confirm(
        self, channel: Channel, exchange: str, routing_key: str, message: aio_pika.Message
    ) -> None:
        target = channel.amqp.default_exchange
        await _guard(
            f"publishing to {routing_key!r}",
            target.publish,
            message,
            routing_key=routing_key,
            mandatory=True,
        )


async def _guard(
    what: str, fn: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any
) -> None:
    """Call a broker coroutine function under PUBLISH_TIMEOUT; failures become Unavailable
    (or FailedPrecondition when RabbitMQ refuses the request itself)."""
    try:
        with trio.fail_after(PUBLISH_TIMEOUT):
            await aio.call(fn, *args, **kwargs)
    except aio_pika.exceptions.PublishError:
        raise
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise FailedPrecondition(f"RabbitMQ refused {what}: {describe(error)}") from None
    except trio.TooSlowError:
        raise Unavailable(f"RabbitMQ did not confirm {what} within {PUBLISH_TIMEOUT:g} s") from None
    except BROKER_ERRORS as error:
        raise Unavailable(f"RabbitMQ is unavailable ({what}): {describe(error)}") from None
