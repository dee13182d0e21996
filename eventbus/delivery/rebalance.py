"""Rebalancing prefetched messages between nodes.

A node whose subscribers wait on an empty buffer while RabbitMQ has nothing to give it is
starving: another node's consumers hold the queue's messages in their prefetch. The starving
node says so on the fanout `<namespace>.rebalance`; a node that holds prefetched messages of that
queue and has no subscriber waiting for them hands them back to RabbitMQ and pauses consuming
the queue for a moment, so they reach the starving node. Rate limits keep nodes from ping-ponging,
and the watcher starts again after any error (the original's could exit for good).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
import aio_pika.abc
import trio

from ..backends import aio
from ..backends.broker import Broker
from ..backends.retry import keep_running
from ..ops.metrics import Metrics
from .consumer import Consumers, QueueConsumer, close_after_failed_call
from .envelope import internal_message
from .publisher import Publisher

logger = logging.getLogger(__name__)

STARVING_AFTER = 1.0  # a subscriber waiting this long on an empty buffer: starving
ANNOUNCE_EVERY = 1.0  # per queue, at most one announcement a second from a node
RELEASE_EVERY = 5.0  # per queue, a node hands messages back at most this often
PAUSE_SECONDS = 3.0  # and then leaves the queue to the others this long
CHECK_EVERY = 0.25
RESTART_AFTER = 1.0


@dataclass(frozen=True)
class QueueState:
    """What a node knows about one queue it consumes."""

    queue: str
    buffered: int
    waiting_since: float | None  # time.monotonic(); None: nobody waits
    # a message taken is still being recorded: releasing now would requeue it mid hand-out
    handing_out: bool = False


def starving(states: Iterable[QueueState], now: float, announced: dict[str, float]) -> list[str]:
    """The queues to announce: subscribers have waited on an empty buffer long enough, and
    the last announcement is old enough."""
    return [
        s.queue
        for s in states
        if s.buffered == 0
        and s.waiting_since is not None
        and now - s.waiting_since >= STARVING_AFTER
        and now - announced.get(s.queue, -1e9) >= ANNOUNCE_EVERY
    ]


def should_release(state: QueueState | None, now: float, released: dict[str, float]) -> bool:
    """Give a queue's prefetched messages back: this node holds some, nobody here waits for
    them, and it has not done so for this queue lately."""
    return (
        state is not None
        and state.buffered > 0
        and state.waiting_since is None
        and not state.handing_out
        and now - released.get(state.queue, -1e9) >= RELEASE_EVERY
    )


class Rebalancer:
    """One node's side of rebalancing: announcing starvation and answering others'."""

    def __init__(
        self,
        node: str,
        broker: Broker,
        publisher: Publisher,
        consumers: Consumers,
        exchange: str,
        metrics: Metrics,
    ) -> None:
        self.node = node
        self._broker = broker
        self._publisher = publisher
        self._consumers = consumers
        self._exchange = exchange
        self._metrics = metrics
        self._announced: dict[str, float] = {}
        self._released: dict[str, float] = {}

    async def run(self) -> None:
        """Announce and listen forever; either part starts again after an error."""
        async with trio.open_nursery() as nursery:
            for what, part in (("announcing", self._announce_forever), ("listening", self._listen)):
                nursery.start_soon(
                    keep_running, f"rebalance {what}", part, (Exception,), RESTART_AFTER
                )

    def states(self) -> list[QueueState]:
        return [_state_of(c) for c in self._consumers.running()]

    async def _announce_forever(self) -> None:
        while True:
            now = time.monotonic()
            for queue in starving(self.states(), now, self._announced):
                self._announced[queue] = now
                body = json.dumps({"node": self.node, "queue": queue}).encode()
                await aio.call(
                    self._publisher.publish_to, ("topic", self._exchange), internal_message(body)
                )
                logger.debug("rebalance: %s is starving for %s", self.node, queue)
            await trio.sleep(CHECK_EVERY)

    async def _listen(self) -> None:
        """Consume the rebalance exchange on a queue of this node's own (exclusive, gone with
        the connection) and answer each announcement."""
        await self._broker.wait_connected()
        await aio.call(self._publisher.declare_topic, self._exchange)
        send, receive = trio.open_memory_channel[bytes](100)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # asyncio side: announcements are hints, so a full channel drops one
            with contextlib.suppress(trio.WouldBlock):
                send.send_nowait(message.body)

        channel = await self._broker.channel()
        consuming = False
        try:
            with trio.fail_after(5):
                # Classic whatever amqp.queue_type says: RabbitMQ refuses a quorum queue that is
                # exclusive, auto-delete or server-named, and this one holds only hints for this
                # node's connection (no_ack), which need no replication. Said outright, so a
                # virtual host's default queue type cannot make it quorum.
                queue = await aio.call(
                    channel.amqp.declare_queue,
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-queue-type": "classic"},
                )
                await aio.call(queue.bind, self._exchange, routing_key="#")
                await aio.call(queue.consume, on_message, no_ack=True)
            consuming = True
            while not channel.amqp.is_closed:
                with trio.move_on_after(1):
                    self.answer(await receive.receive())
        finally:
            await (channel.close() if consuming else close_after_failed_call(channel))

    def answer(self, raw: bytes) -> None:
        """Release the announced queue here if this node holds its messages idle."""
        try:
            announcement = json.loads(raw)
            node, queue = str(announcement["node"]), str(announcement["queue"])
        except (ValueError, KeyError, TypeError):
            logger.debug("rebalance: ignoring a malformed announcement")
            return
        if node == self.node:
            return
        consumer = self._consumers.get(queue)
        now = time.monotonic()
        if consumer is not None and should_release(_state_of(consumer), now, self._released):
            self._released[queue] = now
            consumer.release(
                f"handing {len(consumer.buffer)} prefetched messages to {node}", PAUSE_SECONDS
            )
            self._metrics.released.labels(queue).inc()


def _state_of(consumer: QueueConsumer) -> QueueState:
    handing_out = consumer.handing_out(time.monotonic())
    return QueueState(
        consumer.queue, len(consumer.buffer), consumer.buffer.waiting_since, handing_out
    )
