"""Background workers: the internal confirm and ack queues, written to PostgreSQL in batches.

Each internal queue is consumed on one channel. One task gathers what arrives into batches of up
to BATCH_SIZE messages (or what arrived within BATCH_WAIT seconds of the first); up to
`background.workers` writers then write batches concurrently, one statement each, and only then
ack their messages. While PostgreSQL is down the messages wait, unacked and durable, in RabbitMQ.
A batch PostgreSQL refuses because of some of its rows is split until those are found: they are
quarantined (the `quarantine` table) and every other row is stored. A message of the confirm or
ack queue may carry many records or settlements (packed, see delivery/packing.py): they count as
rows of their own, and one PostgreSQL refuses is quarantined alone, encoded as one message.

The ack queue is applied in order: one node at a time consumes it (an exclusive consumer; the
others stand by and take over when it goes, or when it cannot write for IN_ORDER_GIVE_UP
seconds), and records in `ledger_progress` the time up to which every settlement confirmed in
the queue has been applied. The republish cron waits for that time to
pass a deadline before it acts on it, so an ack stored late (PostgreSQL stalled, say) still
beats its redelivery.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aio_pika.abc
import aiormq.exceptions
import asyncpg
import trio

from ..backends import aio
from ..backends.broker import BROKER_ERRORS, Broker, Channel
from ..backends.pgerrors import BROKEN_CONNECTION
from ..backends.retry import describe, keep_running
from ..backends.store import Store
from ..delivery.consumer import close_after_failed_call
from ..delivery.envelope import (
    ROWS_HEADER,
    DelayedMessage,
    Marker,
    Packed,
    Settlement,
    decode_records,
    decode_settlement,
)
from ..delivery.operations import InternalQueues
from ..delivery.publisher import limit_refused, with_limit
from ..errors import Unavailable
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from . import delay, ledger, quarantine

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)

BATCH_SIZE = 500
BATCH_BYTES = 16 << 20  # a batch ends once its messages hold this many bytes
BATCH_WAIT = 0.02
PING_TIMEOUT = 2.0
IN_ORDER_GIVE_UP = 30.0  # writing that long in vain, a node hands an in-order queue over
HANDED_OVER_SECONDS = 10.0  # and leaves it to the others for that long
WRITE_RETRY_MAX = 5.0
SESSION_ERRORS: tuple[type[BaseException], ...] = (Unavailable, trio.TooSlowError, *BROKER_ERRORS)

# PostgreSQL failing whatever the rows are: unreachable, timing out, out of resources, shutting
# down, read-only, or missing the schema. The batch waits and is retried whole; any other failure
# is blamed on the rows, and the batch is split to find them.
# Failures a batch too heavy for PostgreSQL causes (its statement times out, or PostgreSQL drops
# the connection while taking it), as well as an outage: told apart by Store.ping.
HEAVY: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    trio.TooSlowError,
    asyncpg.InterfaceError,  # the client's own state, the pool closing
    *BROKEN_CONNECTION,  # a pooled connection its server died under
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
)
NOT_THE_ROWS: tuple[type[BaseException], ...] = (
    *HEAVY,
    asyncpg.InsufficientResourcesError,  # 53
    asyncpg.OperatorInterventionError,  # 57
    asyncpg.TransactionRollbackError,  # 40: deadlock, serialization failure
    asyncpg.InvalidTransactionStateError,  # 25
    asyncpg.SyntaxOrAccessError,  # 42
    asyncpg.InternalServerError,  # XX
)

Item = TypeVar("Item")
T = TypeVar("T")
Counts = list[tuple[str, str, int]]
Bad = tuple[bytes, str]  # a raw message and why it is set aside
# An item and the message it came in; None: one of a packed message's, set aside on its own
# (encoded alone) should PostgreSQL refuse it.
Decoded = tuple[bytes | None, Item]
Writer = Callable[[Store, Sequence[Item]], Awaitable[Counts]]


class Worker(Generic[Item]):
    """Consumes one internal queue and writes what arrives through writer, batch by batch, with
    up to `writers` batches in flight."""

    def __init__(
        self,
        broker: Broker,
        store: Store,
        metrics: Metrics,
        queue: str,
        decode: Callable[[bytes], Item],
        writer: Writer[Item],
        writers: int,
        in_order: InOrder | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self._broker = broker
        self._arguments = arguments or {}  # the queue's, as the publisher declares it
        self._limitless = False  # the queue exists without x-delivery-limit: declared so
        self._store = store
        self._metrics = metrics
        self.queue = queue
        self._decode = decode
        self._writer = writer
        self._writers = writers
        self._in_order = in_order
        self._progress = Progress()

    async def run(self) -> None:
        """Consume and write forever; a lost connection starts a new session on the next one."""
        await keep_running(f"bookkeeping {self.queue}", self._session, SESSION_ERRORS)

    async def _session(self) -> None:
        await self._broker.wait_connected()
        prefetch = BATCH_SIZE * (self._writers + 1)
        send, receive = trio.open_memory_channel[aio_pika.abc.AbstractIncomingMessage](prefetch)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            # asyncio side; prefetch equals the channel's capacity, so it never overflows
            send.send_nowait(message)

        channel = await self._broker.channel(prefetch=prefetch)
        failed_call = True
        try:
            consuming = await self._consume(channel, on_message)
            failed_call = False
            if not consuming:
                return  # standing by: keep_running's pause spaces the tries
            self._progress = Progress()
            await self._write_batches(channel, receive)
        except HandOver as handing:
            logger.warning("bookkeeping %s: %s", self.queue, handing)
            await channel.close()
            await trio.sleep(HANDED_OVER_SECONDS)
        finally:
            await (close_after_failed_call(channel) if failed_call else channel.close())

    async def _consume(self, channel: Channel, on_message: Callable[..., Awaitable[None]]) -> bool:
        """Declare the queue and consume it; False when it is in order and another node's
        consumer has it (RabbitMQ refuses a second exclusive consumer)."""
        exclusive = self._in_order is not None
        arguments = with_limit(self._arguments, self._broker.server_version)
        if self._limitless:
            arguments.pop("x-delivery-limit", None)
        with trio.fail_after(5):
            try:
                queue = await aio.call(
                    channel.amqp.declare_queue,
                    self.queue,
                    durable=True,
                    arguments=arguments or None,
                )
            except aiormq.exceptions.ChannelPreconditionFailed as error:
                self._limitless = self._limitless or limit_refused(str(error), arguments)
                raise  # the session starts again on a new channel, declaring it as it is
            if exclusive and queue.declaration_result.consumer_count:
                return False  # another node's consumer has it
            try:
                await aio.call(queue.consume, on_message, exclusive=exclusive)
            except aiormq.exceptions.ChannelAccessRefused:
                if not exclusive:
                    raise
                logger.debug("bookkeeping %s: another node applies it; standing by", self.queue)
                return False
        if exclusive:
            logger.info("bookkeeping %s: this node applies it, in order", self.queue)
        return True

    async def _write_batches(
        self, channel: Channel, receive: trio.MemoryReceiveChannel[Any]
    ) -> None:
        """Hand batches to writers until the channel or connection goes, or a writer's ack
        fails (Unavailable then: the session starts again, its unacked messages come back)."""
        in_flight = trio.CapacityLimiter(self._writers)
        failed: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            while not channel.amqp.is_closed and channel.generation == self._broker.generation:
                batch = await _gather(receive)
                if batch:
                    await in_flight.acquire_on_behalf_of(batch[0])
                    ticket = self._progress.take()
                    nursery.start_soon(
                        self._write_and_ack, batch, ticket, in_flight, failed, nursery
                    )
            nursery.cancel_scope.cancel()
        if failed and isinstance(failed[0], HandOver):
            raise failed[0]
        if failed:
            raise Unavailable(f"acking a written batch failed: {describe(failed[0])}")

    async def _write_and_ack(
        self,
        batch: list[aio_pika.abc.AbstractIncomingMessage],
        ticket: int,
        in_flight: trio.CapacityLimiter,
        failed: list[BaseException],
        session: trio.Nursery,
    ) -> None:
        """Write a batch, then ack it; an ack that fails ends the session, not the worker."""
        try:
            newest = await self._write(batch)
            await self._record_progress(ticket, newest)
            with trio.fail_after(5):
                await aio.call(_ack_each, batch)
        except ENDS_SESSION as error:
            failed.append(error)
            session.cancel_scope.cancel()
        finally:
            in_flight.release_on_behalf_of(batch[0])

    async def _write(self, batch: list[aio_pika.abc.AbstractIncomingMessage]) -> float | None:
        """Store the batch, retrying it whole with back-off while PostgreSQL is unreachable;
        what PostgreSQL refuses, or what cannot be read, is quarantined instead. Returns the
        newest publishing time among its items, for a queue applied in order."""
        items, bad = self._decode_all(batch)
        attempts = itertools.count()
        counts, refused = await self._retrying(
            len(items), lambda: self._isolate(items, split_heavy=next(attempts) > 0)
        )
        bad += refused
        if bad:
            await self._retrying(len(bad), lambda: quarantine.keep(self._store, self.queue, bad))
            self._report(bad)
        self._metrics.count_settled(counts)
        if self._in_order is None or not items:
            return None
        return max(self._in_order.published_at(item) for _, item in items)

    async def _record_progress(self, ticket: int, newest: float | None) -> None:
        """Mark a batch applied; when that extends the applied prefix, store how far it goes."""
        through = self._progress.finish(ticket, newest)
        if self._in_order is not None and through is not None:
            name = self._in_order.progress
            await self._retrying(1, lambda: ledger.advance(self._store, name, through))

    async def _retrying(self, rows: int, write: Callable[[], Awaitable[T]]) -> T:
        pause, started = 0.2, trio.current_time()
        while True:
            try:
                return await write()
            except NOT_THE_ROWS as error:
                if self._in_order and trio.current_time() - started > IN_ORDER_GIVE_UP:
                    raise HandOver(
                        f"writing failed for {IN_ORDER_GIVE_UP:g} s ({describe(error)}); "
                        "another node may take the queue over"
                    ) from None
                logger.warning(
                    "bookkeeping %s: writing %d rows failed (%s); retrying in %.1f s",
                    self.queue,
                    rows,
                    describe(error),
                    pause,
                )
            await trio.sleep(pause)
            pause = min(pause * 2, WRITE_RETRY_MAX)

    async def _isolate(
        self, items: list[Decoded[Item]], *, split_heavy: bool
    ) -> tuple[Counts, list[Bad]]:
        """Write items; when PostgreSQL refuses them for a reason of theirs, split them in halves
        until the refused ones are alone. Returns the counts and the refused (raw, reason).
        split_heavy (the batch failed before): halve it too when it times out or loses the
        connection while PostgreSQL answers, as a batch too heavy to take at once does."""
        if not items:
            return [], []
        try:
            return await self._writer(self._store, [item for _, item in items]), []
        except NOT_THE_ROWS as error:
            if not (split_heavy and len(items) > 1 and await self._too_heavy(error)):
                raise
        except Exception as error:
            if len(items) == 1:
                return [], [(_raw(items[0]), f"PostgreSQL refused it: {describe(error)}")]
        half = len(items) // 2
        counts, bad = await self._isolate(items[:half], split_heavy=split_heavy)
        more_counts, more_bad = await self._isolate(items[half:], split_heavy=split_heavy)
        return counts + more_counts, bad + more_bad

    async def _too_heavy(self, error: BaseException) -> bool:
        """Whether a batch failed for its weight: a timeout or lost connection while PostgreSQL
        answers and takes writes (Store.ping)."""
        if not isinstance(error, HEAVY):
            return False
        with trio.move_on_after(PING_TIMEOUT):
            try:
                await self._store.ping()
            except Exception:
                return False
            logger.info(
                "bookkeeping %s: a batch failed (%s); halving it", self.queue, describe(error)
            )
            return True
        return False

    def _decode_all(
        self, batch: list[aio_pika.abc.AbstractIncomingMessage]
    ) -> tuple[list[Decoded[Item]], list[Bad]]:
        """The items of a batch's messages, in order (a packed message's one by one), and the
        messages that cannot be read."""
        items: list[Decoded[Item]] = []
        bad = []
        for message in batch:
            try:
                decoded: Any = self._decode(message.body)
            except (ValueError, TypeError) as error:
                bad.append((message.body, f"malformed: {describe(error)}"))
                continue
            if isinstance(decoded, Packed):
                items.extend((None, item) for item in decoded.items)
            else:
                items.append((message.body, decoded))
        return items, bad

    def _report(self, bad: list[Bad]) -> None:
        self._metrics.quarantined.labels(self.queue).inc(len(bad))
        ratelog.error(
            f"quarantine {self.queue}",
            "bookkeeping %s: %d message(s) set aside in table quarantine: %s",
            self.queue,
            len(bad),
            bad[0][1],
        )


class HandOver(Exception):
    """This node cannot write an in-order queue: it lets another node's consumer take it."""


ENDS_SESSION: tuple[type[BaseException], ...] = (*SESSION_ERRORS, HandOver)


@dataclass(frozen=True)
class InOrder:
    """A queue applied in order: its progress row, and when each item was published."""

    progress: str
    published_at: Callable[[Any], float]


class Progress:
    """How far an in-order queue is applied: batches are taken in queue order and finish in any
    order; the applied prefix ends before the first unfinished one."""

    def __init__(self) -> None:
        self._batches: OrderedDict[int, tuple[bool, float | None]] = OrderedDict()
        self._tickets = itertools.count()
        self.through: float | None = None

    def take(self) -> int:
        """A ticket for the next batch, in queue order."""
        ticket = next(self._tickets)
        self._batches[ticket] = (False, None)
        return ticket

    def finish(self, ticket: int, newest: float | None) -> float | None:
        """Mark a batch applied; returns the newest publishing time of the applied prefix when
        this moved it forward, else None."""
        self._batches[ticket] = (True, newest)
        moved = False
        while self._batches and next(iter(self._batches.values()))[0]:
            _, (_, stamp) = self._batches.popitem(last=False)
            if stamp is not None and (self.through is None or stamp > self.through):
                self.through, moved = stamp, True
        return self.through if moved else None


async def write_settlements(store: Store, items: Sequence[Settlement | Marker]) -> Counts:
    """Settlements stored; markers only mark progress."""
    settlements = [item for item in items if isinstance(item, Settlement)]
    return await ledger.write_settlements(store, settlements) if settlements else []


def _raw(decoded: Decoded[Any]) -> bytes:
    """The message an item came in; one of a packed message's encoded alone."""
    raw, item = decoded
    return raw if raw is not None else item.encode()


def _rows(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    """How many records or settlements a message carries: a packed one names it."""
    rows = message.headers.get(ROWS_HEADER, 1) if message.headers else 1
    return rows if isinstance(rows, int) and rows > 0 else 1


async def _ack_each(batch: list[aio_pika.abc.AbstractIncomingMessage]) -> None:
    """(asyncio side) Ack every message of a batch; batches finish out of order, so one
    multiple-ack could cover messages another writer still holds."""
    for message in batch:
        await message.ack()


async def _gather(receive: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    """Messages of up to BATCH_SIZE records or settlements (a packed message counts those it
    carries), ending with the one that brings their bodies to BATCH_BYTES: waits for the first
    (at most a second), then BATCH_WAIT more."""
    batch: list[Any] = []
    with trio.move_on_after(1):
        batch.append(await receive.receive())
    if not batch:
        return batch
    size, rows = len(batch[0].body), _rows(batch[0])
    with trio.move_on_after(BATCH_WAIT):
        while rows < BATCH_SIZE and size < BATCH_BYTES:
            batch.append(await receive.receive())
            size, rows = size + len(batch[-1].body), rows + _rows(batch[-1])
    return batch


async def run(
    broker: Broker,
    store: Store,
    metrics: Metrics,
    internal: InternalQueues,
    workers: int,
    arguments: dict[str, Any] | None = None,
) -> None:
    """Write the internal queues to PostgreSQL forever, up to `workers` batches at a time each;
    the queues are declared with arguments (Publisher.queue_arguments: their type), their
    x-delivery-limit as the broker connected to asks (with_limit), as the publisher does."""
    settlements_in_order = InOrder(ledger.SETTLEMENTS_PROGRESS, lambda item: item.at)
    writers: list[tuple[str, Callable[[bytes], Any], Writer[Any], InOrder | None]] = [
        (internal.confirm, decode_records, ledger.write_records, None),
        (internal.ack, decode_settlement, write_settlements, settlements_in_order),
        (internal.delay, DelayedMessage.decode, delay.write, None),
    ]
    async with trio.open_nursery() as nursery:
        for queue, decode, writer, in_order in writers:
            worker = Worker(
                broker, store, metrics, queue, decode, writer, workers, in_order, arguments
            )
            nursery.start_soon(worker.run)
