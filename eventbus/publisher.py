"""Publishing with publisher confirms: channel pools per queue, queues declared once.

The request path (gRPC handlers) publishes from the asyncio side of the seam with `publish`, so
a call costs no task of its own; trio code uses `to_queue` / `to_targets`, which cross the seam
once. Every publish waits for RabbitMQ's confirm (or a return, for an unroutable message) under
PUBLISH_TIMEOUT, so a broken connection turns into Unavailable within seconds, never a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar, cast

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
import aiormq.exceptions
from pamqp.commands import Basic

from . import aio, bulk
from .broker import BROKER_ERRORS, Broker
from .envelope import Kind, Outgoing
from .errors import FailedPrecondition, Unavailable
from .retry import describe

logger = logging.getLogger(__name__)

T = TypeVar("T")

PUBLISH_TIMEOUT = 5.0
BULK_PER_DEADLINE = 5000  # a bulk publish gets PUBLISH_TIMEOUT more for each this many messages


class ChannelPool:
    """A few confirm channels of one connection generation, used round robin (asyncio side)."""

    def __init__(self, broker: Broker, size: int) -> None:
        self._broker = broker
        self._size = size
        self._channels: list[aio_pika.abc.AbstractChannel] = []
        self._generation = -1
        self._turn: Iterator[int] = itertools.count()
        self._lock = asyncio.Lock()

    async def get(self) -> aio_pika.abc.AbstractChannel:
        if self._generation != self._broker.generation or len(self._live()) < self._size:
            async with self._lock:
                await self._refill()
        live = self._channels
        return live[next(self._turn) % len(live)]

    async def underlays(self) -> list[aiormq.Channel]:
        """Every channel of the pool, as aiormq channels (for the bulk path)."""
        await self.get()
        return [cast(aiormq.Channel, await c.get_underlay_channel()) for c in self._channels]

    def _live(self) -> list[aio_pika.abc.AbstractChannel]:
        return [c for c in self._channels if not c.is_closed]

    async def _refill(self) -> None:
        connection = self._broker.connection  # BrokerUnavailable while there is none
        if self._generation != self._broker.generation:
            self._channels, self._generation = [], self._broker.generation
        live = self._live()
        while len(live) < self._size:
            live.append(
                await _bounded("opening a channel", connection.channel(publisher_confirms=True))
            )
        self._channels = live


Target = tuple[Kind, str]  # ("queue", name) or ("topic", name)


class Publisher:
    """Confirmed publishing to queues and topic exchanges, with declarations cached per
    connection."""

    def __init__(self, broker: Broker, producers_per_queue: int) -> None:
        self._broker = broker
        self._producers = producers_per_queue
        self._pools: dict[str, ChannelPool] = {}
        self._declared: set[tuple[str, ...]] = set()
        self._declared_generation = 0

    def _pool(self, name: str) -> ChannelPool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = ChannelPool(self._broker, self._producers)
        return pool

    async def publish(self, queue: str, message: Outgoing) -> None:
        """(asyncio side) Publish to queue, declaring it once, and wait for the confirm."""
        await self.publish_to(("queue", queue), message)

    async def publish_topic(self, topic: str, message: Outgoing) -> None:
        """(asyncio side) Publish to a topic exchange and wait for the confirm. Every queue
        bound to it gets the message; with none bound it goes nowhere, as pub/sub has it."""
        await self.publish_to(("topic", topic), message)

    async def publish_to(self, target: Target, message: Outgoing) -> None:
        """(asyncio side) Publish to ("queue", name) or ("topic", name) and wait for the
        confirm. A message RabbitMQ returns as unroutable (its queue was deleted behind our
        back) is declared and published once more."""
        try:
            await _bounded(f"publishing to {target[1]!r}", self._confirm(target, message))
        except Returned:
            self._declared.discard(target)
            await _bounded(f"publishing to {target[1]!r}", self._confirm(target, message))

    async def _confirm(self, target: Target, message: Outgoing) -> None:
        """Publish on one of the target's channels and wait for RabbitMQ's confirm."""
        await self._declare_target(target)
        pooled = await self._pool(target[1]).get()
        channel = cast(aiormq.Channel, await pooled.get_underlay_channel())
        (confirmation,) = await bulk.send(channel, [_publish_of(target, message)])
        if not isinstance(await confirmation, Basic.Ack):
            raise Returned(target[1])

    async def _declare_target(self, target: Target) -> None:
        kind, name = target
        if kind == "topic":
            await self.declare_topic(name)
        else:
            await self.declare(name)

    async def declare(self, queue: str) -> None:
        """(asyncio side) Declare a durable queue once per connection."""
        if self._known(("queue", queue)):
            return
        channel = await self._pool(queue).get()
        await _bounded(f"declaring queue {queue!r}", channel.declare_queue(queue, durable=True))
        self._declared.add(("queue", queue))

    async def declare_topic(self, topic: str) -> None:
        """(asyncio side) Declare a durable topic exchange once per connection."""
        if self._known(("topic", topic)):
            return
        channel = await self._pool(topic).get()
        declaring = channel.declare_exchange(topic, aio_pika.ExchangeType.TOPIC, durable=True)
        await _bounded(f"declaring topic {topic!r}", declaring)
        self._declared.add(("topic", topic))

    async def bind(self, queue: str, topic: str) -> None:
        """(asyncio side) Declare queue and topic and bind them, once per connection: from then
        on the queue gets every message published to the topic."""
        if self._known(("binding", queue, topic)):
            return
        await self.declare_topic(topic)
        channel = await self._pool(queue).get()
        declared = await _bounded(
            f"declaring queue {queue!r}", channel.declare_queue(queue, durable=True)
        )
        await _bounded(f"binding {queue!r} to {topic!r}", declared.bind(topic, routing_key="#"))
        self._declared.update({("queue", queue), ("binding", queue, topic)})

    def _known(self, declaration: tuple[str, ...]) -> bool:
        if self._declared_generation != self._broker.generation:
            self._declared.clear()  # a reconnect: the broker may have lost what it had
            self._declared_generation = self._broker.generation
        return declaration in self._declared

    async def message_count(self, queue: str) -> int:
        """(asyncio side) How many messages wait in an existing queue."""
        channel = await self._pool(queue).get()
        declared = await _bounded(
            f"inspecting queue {queue!r}", channel.declare_queue(queue, passive=True)
        )
        return int(declared.declaration_result.message_count or 0)

    async def to_queue(self, queue: str, message: Outgoing) -> None:
        """(trio side) Publish to a queue and wait for the confirm."""
        await aio.call(self.publish, queue, message)

    async def to_targets(self, messages: Sequence[tuple[Target, Outgoing]]) -> None:
        """(trio side) Publish many messages at once, each to its queue or topic; returns once
        all are confirmed, or raises the first failure."""
        await aio.call(self._publish_all, messages)

    async def declare_queue(self, queue: str) -> None:
        """(trio side) Declare a durable queue once per connection."""
        await aio.call(self.declare, queue)

    async def _publish_all(self, messages: Sequence[tuple[Target, Outgoing]]) -> None:
        """(asyncio side) The bulk path: each target declared once, then every message sent in
        one write per channel of its target, under one deadline that grows with the batch.
        What RabbitMQ returns as unroutable goes again through the single path (which
        re-declares)."""
        channels: dict[Target, list[aiormq.Channel]] = {}
        for target in dict.fromkeys(target for target, _ in messages):
            await self._declare_target(target)
            channels[target] = await self._pool(target[1]).underlays()
        for batch in _rounds(messages):
            await self._publish_round(batch, channels)

    async def _publish_round(
        self,
        messages: Sequence[tuple[Target, Outgoing]],
        channels: dict[Target, list[aiormq.Channel]],
    ) -> None:
        per_channel: dict[aiormq.Channel, list[int]] = {}
        for i, (target, _) in enumerate(messages):
            options = channels[target]
            per_channel.setdefault(options[i % len(options)], []).append(i)

        async def send_and_confirm() -> list[Any]:
            confirmations: dict[int, asyncio.Future[Any]] = {}
            for channel, indexes in per_channel.items():
                sent = await bulk.send(channel, [_publish_of(*messages[i]) for i in indexes])
                confirmations.update(zip(indexes, sent, strict=True))
            in_order = (confirmations[i] for i in range(len(messages)))
            return await asyncio.gather(*in_order, return_exceptions=True)

        seconds = PUBLISH_TIMEOUT * (1 + len(messages) // BULK_PER_DEADLINE)
        results = await _bounded(
            f"publishing {len(messages)} messages", send_and_confirm(), seconds
        )
        for (target, message), result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                await _bounded("publishing", _fail(result))
            if not isinstance(result, Basic.Ack):
                await self.publish_to(target, message)


def _rounds(messages: Sequence[tuple[Target, Outgoing]]) -> list[list[tuple[Target, Outgoing]]]:
    """Split messages so that no message id occurs twice in a round (a message retried in two
    queues at once, say): RabbitMQ returns an unroutable message by id, not by delivery tag."""
    rounds: list[list[tuple[Target, Outgoing]]] = []
    seen: dict[str, int] = {}
    for item in messages:
        message_id = item[1].properties.message_id
        n = seen.get(message_id, 0) if message_id else 0
        if message_id:
            seen[message_id] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(item)
    return rounds


def _publish_of(target: Target, message: Outgoing) -> bulk.Publish:
    kind, name = target
    return bulk.Publish(
        exchange=name if kind == "topic" else "",
        routing_key=name,
        mandatory=kind == "queue",
        body=message.body,
        properties=message.properties,
    )


async def _fail(error: BaseException) -> None:
    raise error


class Returned(Exception):
    """RabbitMQ returned a mandatory message: no queue of that name (any more)."""


async def _bounded(what: str, call: Awaitable[T], seconds: float = PUBLISH_TIMEOUT) -> T:
    """(asyncio side) Await a broker call for at most seconds; broker failures become
    Unavailable, a refusal by RabbitMQ itself FailedPrecondition."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except Returned:
        raise
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise FailedPrecondition(f"RabbitMQ refused {what}: {describe(error)}") from None
    except TimeoutError:
        raise Unavailable(f"RabbitMQ did not confirm {what} within {seconds:g} s") from None
    except BROKER_ERRORS as error:
        raise Unavailable(f"RabbitMQ is unavailable ({what}): {describe(error)}") from None
