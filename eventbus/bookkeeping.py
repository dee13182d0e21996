"""Background workers: the internal confirm and ack queues, written to PostgreSQL in batches.

Each worker consumes one internal queue on its own channel, gathers up to BATCH_SIZE messages
(or what arrived within BATCH_WAIT seconds), writes them in one statement and only then acks
them. While PostgreSQL is down the messages wait, unacked and durable, in RabbitMQ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import aio_pika.abc
import asyncpg
import trio

from . import aio, ledger
from .broker import BROKER_ERRORS, Broker, Channel
from .envelope import DeliveryRecord, Settlement
from .errors import Unavailable
from .metrics import Metrics
from .retry import describe
from .store import Store

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
BATCH_WAIT = 0.02
WRITE_RETRY_MAX = 5.0
SESSION_ERRORS: tuple[type[BaseException], ...] = (Unavailable, trio.TooSlowError, *BROKER_ERRORS)

Item = TypeVar("Item")
Writer = Callable[[Store, Sequence[Item]], Awaitable[list[tuple[str, str, int]]]]


class Worker(Generic[Item]):
    """Consumes one internal queue and writes what arrives through writer, batch by batch."""

    def __init__(
        self,
        broker: Broker,
        store: Store,
        metrics: Metrics,
        queue: str,
        decode: Callable[[bytes], Item],
        writer: Writer[Item],
    ) -> None:
        self._broker = broker
        self._store = store
        self._metrics = metrics
        self.queue = queue
        self._decode = decode
        self._writer = writer

    async def run(self) -> None:
        """Consume and write forever; a lost connection starts a new session on the next one."""
        while True:
            await self._broker.wait_connected()
            try:
                await self._session()
            except SESSION_ERRORS as error:
                logger.warning("bookkeeping %s: %s; starting again", self.queue, describe(error))
                await trio.sleep(1)

    async def _session(self) -> None:
        send, receive = trio.open_memory_channel[aio_pika.abc.AbstractIncomingMessage](
            BATCH_SIZE * 2
        )

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # asyncio side; prefetch equals the channel's capacity, so it never overflows
            send.send_nowait(message)

        channel = await self._broker.channel(prefetch=BATCH_SIZE * 2)
        try:
            with trio.fail_after(5):
                queue = await aio.call(channel.amqp.declare_queue, self.queue, durable=True)
                await aio.call(queue.consume, on_message)
            await self._write_batches(channel, receive)
        finally:
            with trio.move_on_after(5, shield=True):
                if not channel.amqp.is_closed:
                    await aio.call(channel.amqp.close)

    async def _write_batches(
        self, channel: Channel, receive: trio.MemoryReceiveChannel[Any]
    ) -> None:
        while not channel.amqp.is_closed and channel.generation == self._broker.generation:
            batch = await _gather(receive)
            if not batch:
                continue
            await self._write(batch)
            with trio.fail_after(5):
                await aio.call(batch[-1].ack, multiple=True)

    async def _write(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
        """Write the batch, retrying with back-off while PostgreSQL is unreachable."""
        items = self._decode_all(batch)
        pause = 0.2
        while items:
            try:
                counts = await self._writer(self._store, items)
                break
            except asyncpg.DataError as error:
                logger.error(
                    "bookkeeping %s: dropping a batch PostgreSQL refuses: %s",
                    self.queue,
                    describe(error),
                )
                return
            except Exception as error:
                logger.warning(
                    "bookkeeping %s: writing %d rows failed (%s); retrying in %.1f s",
                    self.queue,
                    len(items),
                    describe(error),
                    pause,
                )
                await trio.sleep(pause)
                pause = min(pause * 2, WRITE_RETRY_MAX)
        else:
            return
        self._count(counts)

    def _decode_all(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> list[Item]:
        items = []
        for message in batch:
            try:
                items.append(self._decode(message.body))
            except (ValueError, TypeError) as error:
                logger.error(
                    "bookkeeping %s: dropping a malformed message: %s", self.queue, describe(error)
                )
        return items

    def _count(self, counts: list[tuple[str, str, int]]) -> None:
        for queue, outcome, count in counts:
            counter = self._metrics.acked if outcome == "ack" else self._metrics.nacked
            counter.labels(queue).inc(count)


async def _gather(receive: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    """Up to BATCH_SIZE items: waits for the first (at most a second), then BATCH_WAIT more."""
    batch: list[Any] = []
    with trio.move_on_after(1):
        batch.append(await receive.receive())
    if not batch:
        return batch
    with trio.move_on_after(BATCH_WAIT):
        while len(batch) < BATCH_SIZE:
            batch.append(await receive.receive())
    return batch


async def run(
    broker: Broker, store: Store, metrics: Metrics, confirm_queue: str, ack_queue: str, workers: int
) -> None:
    """Run workers split between the confirm and the ack queue, forever."""
    for_records = max(1, math.ceil(workers / 2))
    for_settlements = max(1, workers - for_records)
    async with trio.open_nursery() as nursery:
        for _ in range(for_records):
            worker = Worker(
                broker, store, metrics, confirm_queue, DeliveryRecord.decode, ledger.write_records
            )
            nursery.start_soon(worker.run)
        for _ in range(for_settlements):
            nursery.start_soon(
                Worker(
                    broker, store, metrics, ack_queue, Settlement.decode, ledger.write_settlements
                ).run
            )
