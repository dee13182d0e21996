"""Consuming a queue into a bounded local buffer that subscribe calls take from.

Each subscribed queue gets amqp.consumers_per_queue channels whose prefetch adds up to
amqp.prefetch_count, so the buffer never holds more than that. The buffers of a node together
hold at most amqp.buffer_max_bytes (ByteBudget; RabbitMQ ignores a byte prefetch), plus one message
per queue whose buffer is empty. Each channel's prefetch is sized when it opens, for the queue's
typical message size (1 MiB until one has arrived), to the room that is neither buffered nor
promised to the other queues' open channels, and stays so for the session (at least 1 per
channel, so a queue that opens while the budget is spoken for keeps prefetch 1 until its
session ends). A delivery that does not fit is parked: its body is let go and its unacked tag
takes one of its channel's prefetch slots, so RabbitMQ sends that channel one message fewer (none
once all its slots are parked). Parked deliveries of all queues go back to RabbitMQ in one order,
oldest first, each once the room covers it, with its bytes kept for it until it comes again.
After consuming starts, the channels see no call that waits for a reply, only acks, nacks and
their close; the acks of a channel asked for together go together (acks.py). Prefetched
messages nobody takes go back to RabbitMQ after amqp.buffer_hold_seconds, long before
RabbitMQ's consumer_timeout (30 min by default) could close the channel; a queue nobody has
pulled from for amqp.consumer_idle_seconds stops being consumed altogether. A consumer that
loses its connection starts again on the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import aio_pika.abc
import aiormq.abc
import trio

from ..backends import aio
from ..backends.broker import BROKER_ERRORS, CLOSE_TIMEOUT, REFUSALS, Broker, Channel
from ..backends.retry import describe
from ..config import AmqpConfig
from ..errors import CallError, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from ..ops.supervise import Supervisor
from .acks import Acks

logger = logging.getLogger(__name__)
refusal_log = RateLimitedLog(logger)

SWEEP_SECONDS = 0.25
SETTLE_TIMEOUT = 5.0
SETTLE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *BROKER_ERRORS)
SESSION_ERRORS: tuple[type[BaseException], ...] = (
    Unavailable,
    ResourceExhausted,  # the connection is near channel_max: try again later
    trio.TooSlowError,
    *BROKER_ERRORS,
)
QUEUE_REFUSALS: tuple[type[BaseException], ...] = (*REFUSALS, FailedPrecondition, NotFound)
MAX_PAUSE = 30.0
REFUSAL_MEMORY = 1.0  # seconds a refused queue is answered from memory, not asked again
ROOM_TIMEOUT = 10.0  # at most this long waiting for a retired consumer to close its channels
# A hand-out (record published, at most twice under PUBLISH_TIMEOUT, then the AMQP ack) ends
# within this long of its take, even if its settling was never reported.
HAND_OUT = 20.0
# Until a queue's first message shows their size, its prefetch assumes messages this large, so a
# backlog of large messages is not parked by the hundred (each comes twice).
ASSUMED_SIZE = 1024 * 1024
# Bytes kept for a parked delivery handed back are let go after this long if it has not arrived
# (RabbitMQ may have sent it to another consumer, on another node).
RESERVE_SECONDS = 2.0


class Declare(Protocol):
    """Makes sure a queue exists (Publisher.declare_queue), by the bus's rules."""

    async def __call__(self, queue: str, *, again: bool = False) -> None: ...


@dataclass(frozen=True)
class Buffered:
    message: aio_pika.abc.AbstractIncomingMessage
    received_at: float
    on_settled: Callable[[], None] = lambda: None
    size: int = 0  # body bytes, counted against the ByteBudget while buffered
    acks: Acks | None = None  # its channel's, which writes acks together

    async def settle(self, *, ack: bool) -> bool:
        """(asyncio side) Ack (with the channel's other acks of this turn) or requeue the
        delivery, then tell its consumer the hand-out is over; False when its channel failed."""
        tag = self.message.delivery_tag
        try:
            if self.acks is None or tag is None:
                return await settle(self.message, ack=ack)
            if ack:
                return await self.acks.ack(tag)
            requeued = await settle(self.message, ack=False)
            if requeued:
                self.acks.settled(tag)
            return requeued
        finally:
            self.on_settled()


class ByteBudget:
    """The bytes buffered by all of a node's queues, against a cap, and what is promised against
    it: bytes reserved for parked deliveries on their way back, and what each session's prefetch
    may still bring. Parked deliveries of all queues are handed back in one order, oldest first,
    each only once the room covers it. Plain calls, from either side of the seam."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._shares: set[Share] = set()
        self._reserved: deque[tuple[Share, int, float]] = deque()  # (share, size, until)
        self._reserved_bytes = 0

    def share(self, buffer: Buffer) -> Share:
        """A queue's part in the budget, until it leaves()."""
        share = Share(buffer)
        self._shares.add(share)
        return share

    def leave(self, share: Share) -> None:
        self.forget(share)
        self._shares.discard(share)

    def forget(self, share: Share) -> None:
        """The session of share ended: its parked deliveries, the bytes kept for those it
        handed back and its prefetch are no longer its own (RabbitMQ requeues them)."""
        share.clear()
        self._reserved = deque(r for r in self._reserved if r[0] is not share)
        self._reserved_bytes = sum(size for _, size, _ in self._reserved)

    def admits(self, size: int, *, alone: bool) -> bool:
        """Whether a message of size bytes may be buffered; one that would be alone in its
        queue's buffer always may, so no queue stalls behind the others or its own size."""
        return alone or size <= self.room

    def add(self, size: int) -> None:
        self.used += size

    def remove(self, size: int) -> None:
        self.used -= size
        self.hand_out()

    @property
    def reserved(self) -> int:
        """The bytes kept for deliveries handed back, the lapsed ones let go."""
        now = time.monotonic()
        while self._reserved and self._reserved[0][2] <= now:
            self._reserved_bytes -= self._reserved.popleft()[1]
        return self._reserved_bytes

    @property
    def room(self) -> int:
        """The bytes neither buffered nor reserved for a delivery handed back."""
        return max(0, self.cap - self.used - self.reserved)

    def prefetch_room(self, share: Share) -> int:
        """The room left once the other queues' sessions get what their prefetch may still
        bring."""
        promised = sum(s.outstanding for s in self._shares if s is not share)
        return max(0, self.room - promised)

    def reserve(self, share: Share, size: int) -> None:
        """Keep size bytes for a delivery handed back, until it arrives (claim) or RabbitMQ
        has had RESERVE_SECONDS to send it, to this node or another."""
        self._reserved.append((share, size, time.monotonic() + RESERVE_SECONDS))
        self._reserved_bytes += size

    def claim(self, share: Share, size: int) -> None:
        """A delivery of size bytes arrived for share: the bytes kept for it are its own."""
        for index, (owner, reserved, _) in enumerate(self._reserved):
            if owner is share and reserved == size:
                del self._reserved[index]
                self._reserved_bytes -= size
                return

    def hand_out(self) -> None:
        """Make the oldest parked deliveries of all queues due, as long as the room covers
        them, and wake the queues that got one. A delivery larger than the cap never fits:
        it goes back only alone or after the hold time, not blocking the others."""
        room = self.room
        while (share := self._oldest_head()) and share.parked[0].size <= room:
            parked = share.parked.popleft()
            share.make_due(parked)
            self.reserve(share, parked.size)
            room -= parked.size

    def _oldest_head(self) -> Share | None:
        heads = [s for s in self._shares if s.parked and s.parked[0].size <= self.cap]
        return min(heads, key=lambda s: s.parked[0].parked_at, default=None)


class Share:
    """One queue's part in the ByteBudget: its parked deliveries (oldest first), those due to go
    back, and its session's prefetch slots, whose messages of the typical size it may hold."""

    def __init__(self, buffer: Buffer) -> None:
        self.buffer = buffer
        self.parked: deque[Parked] = deque()
        self.due: list[Parked] = []
        self.slots = 0  # the prefetch of the session's channels, added up
        self.typical_size = 0  # a running average of the bodies received, in bytes
        self._woken = trio.Event()

    @property
    def outstanding(self) -> int:
        """What the session's prefetch may still bring beyond what is buffered."""
        return max(0, self.slots * (self.typical_size or ASSUMED_SIZE) - self.buffer.bytes)

    def make_due(self, parked: Parked) -> None:
        self.due.append(parked)
        self._woken.set()

    def take_due(self) -> list[Parked]:
        due, self.due = self.due, []
        if self._woken.is_set():
            self._woken = trio.Event()
        return due

    async def wait_due(self) -> None:
        """Wait until a parked delivery of this queue is due to go back."""
        await self._woken.wait()

    def clear(self) -> None:
        self.parked.clear()
        self.due.clear()
        self.slots = 0


@dataclass(frozen=True)
class Parked:
    """A delivery that did not fit the budget: its tag only, the body let go. Unacked, it takes
    one of its channel's prefetch slots until handed back (give_back) or its channel closes."""

    channel: aiormq.abc.AbstractChannel
    delivery_tag: int
    size: int
    parked_at: float
    acks: Acks | None = None

    async def give_back(self) -> None:
        """(asyncio side) Requeue the delivery; RabbitMQ sends it again at once to a consumer
        with a free slot (this one, usually). A channel already gone has requeued it."""
        try:
            async with asyncio.timeout(SETTLE_TIMEOUT):
                await self.channel.basic_nack(self.delivery_tag, requeue=True)
        except SETTLE_ERRORS as error:
            logger.debug("handing back a parked delivery failed: %s", describe(error))
            return
        if self.acks is not None:
            self.acks.settled(self.delivery_tag)


class Buffer:
    """A FIFO of prefetched messages. take() (asyncio side) waits until one is there; the other
    methods are plain calls, usable from either side of the seam. The bytes it holds count
    against budget."""

    def __init__(self, budget: ByteBudget | None = None) -> None:
        self._items: deque[Buffered] = deque()
        self._waiters: deque[asyncio.Future[Buffered]] = deque()
        self._waiting_since = 0.0
        self._budget = budget or ByteBudget(2**63)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting(self) -> int:
        """How many takers wait for a message now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @property
    def waiting_since(self) -> float | None:
        """Since when (time.monotonic) takers have been waiting without a break; None when
        nobody waits."""
        return self._waiting_since if self.waiting else None

    def put(self, item: Buffered) -> None:
        if not self._hand_to_waiter(item):
            self._items.append(item)
            self._count(item.size)

    def put_back(self, item: Buffered) -> None:
        """Return an item a cancelled taker got; it is next in line again."""
        if not self._hand_to_waiter(item):
            self._items.appendleft(item)
            self._count(item.size)

    def _count(self, size: int) -> None:
        self.bytes += size
        self._budget.add(size)

    def _popleft(self) -> Buffered:
        item = self._items.popleft()
        self.bytes -= item.size
        self._budget.remove(item.size)
        return item

    def _hand_to_waiter(self, item: Buffered) -> bool:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return True
        return False

    def take_now(self) -> Buffered:
        """The oldest item; only when there is one."""
        return self._popleft()

    def peek(self) -> Buffered | None:
        """The oldest item, left in place; None when there is none."""
        return self._items[0] if self._items else None

    async def take(self) -> Buffered:
        """(asyncio side) The oldest item; waits until there is one."""
        if self._items:
            return self._popleft()
        if not self.waiting:
            self._waiting_since = time.monotonic()
        waiter: asyncio.Future[Buffered] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.put_back(waiter.result())  # handed over just as the taker left
            elif waiter in self._waiters:
                self._waiters.remove(waiter)  # else every abandoned take would stay here
            raise

    def fail_waiters(self, error: Exception) -> None:
        """Wake every taker waiting now with error instead of a message."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def take_older_than(self, cutoff: float) -> list[Buffered]:
        old = []
        while self._items and self._items[0].received_at < cutoff:
            old.append(self._popleft())
        return old

    def clear(self) -> None:
        while self._items:
            self._popleft()


class ConsumerStopped(Exception):
    """The consumer stopped (idle); ask the registry for a new one."""


class QueueConsumer:
    """The consumers of one queue and their buffer."""

    def __init__(
        self,
        broker: Broker,
        queue: str,
        config: AmqpConfig,
        metrics: Metrics,
        supervisor: Supervisor,
        declare: Declare,
        budget: ByteBudget | None = None,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self._declare = declare
        self._budget = budget or ByteBudget(config.buffer_max_bytes)
        self.buffer = Buffer(self._budget)
        self._share = self._budget.share(self.buffer)
        self._parked = self._share.parked
        self._in_session = False
        self._supervisor = supervisor
        self._channels_wanted = config.consumers_per_queue
        self._per_channel = max(1, math.ceil(config.prefetch_count / config.consumers_per_queue))
        self._hold_seconds = config.buffer_hold_seconds
        self._idle_seconds = config.consumer_idle_seconds
        self._metrics = metrics
        self._last_demand = time.monotonic()
        self._interrupted: str | None = None
        self._paused_until = 0.0  # trio time
        self.stopped = False
        self.retiring = False  # asked to stop: another queue needs its channels
        self.refusal: CallError | None = None
        self.finished = trio.Event()  # run() has returned and its channels are closed
        self._scope = trio.CancelScope()
        self._in_hand = 0  # messages taken and not yet settled (recording their delivery)
        self._acks: dict[int, Acks] = {}  # the session's, per channel (by id: each holds its own)

    @property
    def _typical_size(self) -> int:
        return self._share.typical_size

    @_typical_size.setter
    def _typical_size(self, size: int) -> None:
        self._share.typical_size = size

    @property
    def active(self) -> bool:
        return not (self.stopped or self.retiring)

    async def take(self) -> Buffered:
        """(asyncio side) The next prefetched message of this queue; waits until one arrives.
        Raises ConsumerStopped once the consumer stops, or RabbitMQ's refusal of the queue."""
        if not self.active:
            raise ConsumerStopped(self.queue)
        self._last_demand = time.monotonic()
        try:
            item = await self.buffer.take()
        finally:
            self._last_demand = time.monotonic()
        self._in_hand += 1
        return replace(item, on_settled=self._settled)

    def take_now(self) -> Buffered:
        """(asyncio side) The oldest buffered message; only when the buffer holds one."""
        item = self.buffer.take_now()
        self._last_demand = time.monotonic()
        self._in_hand += 1
        return replace(item, on_settled=self._settled)

    def _settled(self) -> None:
        self._in_hand -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consume while anybody pulls from the queue; returns once it has been idle a while."""
        task_status.started()
        try:
            with self._scope:
                await self._consume_while_wanted()
        finally:
            self.stopped = True
            self._budget.leave(self._share)
            self.buffer.fail_waiters(ConsumerStopped(self.queue))
            with contextlib.suppress(KeyError):
                self._metrics.buffered_bytes.remove(self.queue)
            self.finished.set()

    async def _consume_while_wanted(self) -> None:
        pause = 1.0
        while not self._idle():
            # An interrupt from here on (a release while waiting, a consumer cancelled
            # while the others are still being set up) ends the coming session.
            self._interrupted = None
            await trio.sleep_until(self._paused_until)
            await self.broker.wait_connected()
            try:
                await self._session()
                pause = 1.0
            except QUEUE_REFUSALS as error:
                self._refused(error)
                return
            except SESSION_ERRORS as error:
                logger.warning("consumer %s: %s; starting again", self.queue, describe(error))
                await trio.sleep(1)
            except Exception as error:
                self._supervisor.failed("consumer", error, subject=self.queue)
                await trio.sleep(pause)
                pause = min(pause * 2, MAX_PAUSE)

    def retire(self) -> None:
        """Stop now, wherever the consumer is (consuming, pausing, backing off): its channels
        close and its prefetched messages go back to RabbitMQ."""
        self.retiring = True
        self._scope.cancel()

    def retirable(self, now: float) -> bool:
        """Nobody waits for a message of this queue, and none is being handed out."""
        return self.active and self.buffer.waiting == 0 and not self.handing_out(now)

    def handing_out(self, now: float) -> bool:
        """Whether a message taken is still being recorded and settled on these channels (as
        a guard, a take older than a hand-out can last counts as done)."""
        return self._in_hand > 0 and now - self._last_demand <= HAND_OUT

    def _refused(self, error: BaseException) -> None:
        """RabbitMQ refuses this queue (declared with other arguments, say), or it does not
        exist where the bus may not create it: the takers waiting now get that answer instead
        of waiting for their deadline."""
        if isinstance(error, CallError):
            self.refusal = error
        else:
            reason = describe(error)
            self.refusal = FailedPrecondition(f"RabbitMQ refused queue {self.queue!r}: {reason}")
        refusal_log.info(type(error).__name__, "consumer %s: %s", self.queue, self.refusal.message)
        self.buffer.fail_waiters(self.refusal)

    async def _session(self) -> None:
        # Declared anew each session (the queue may have been deleted meanwhile), by the
        # publisher's rules: arguments, and whether the bus may create it at all.
        await self._declare(self.queue, again=True)
        channels: list[Channel] = []
        self._in_session = True
        try:
            for _ in range(self._channels_wanted):
                channels.append(await self._consume_on_new_channel())
            logger.debug("consumer %s: consuming on %d channels", self.queue, len(channels))
            await self._watch(channels)
        finally:
            self._in_session = False  # what still arrives dies with its channel
            self._budget.forget(self._share)  # the room it held goes to the others
            self.buffer.clear()  # closing the channels hands their messages back to RabbitMQ
            self._acks.clear()
            with trio.CancelScope(shield=True):  # each close is bounded by itself
                async with trio.open_nursery() as nursery:
                    for channel in channels:
                        nursery.start_soon(channel.close)
            self._budget.forget(self._share)
            self.buffer.clear()

    async def _consume_on_new_channel(self) -> Channel:
        channel = await self.broker.channel(prefetch=self._commit_prefetch())
        consuming = False
        try:
            with trio.fail_after(SETTLE_TIMEOUT):
                underlay = await aio.call(channel.amqp.get_underlay_channel)
                underlay.on_consumer_cancel_callbacks.add(self._on_cancelled_by_broker)
                queue = await aio.call(channel.amqp.get_queue, self.queue, ensure=False)
                consuming = True
                await aio.call(queue.consume, self._on_message)
        except BaseException:
            # The consume may have reached RabbitMQ: a channel left open would keep
            # prefetching into a buffer nobody sweeps.
            await (close_after_failed_call(channel) if consuming else channel.close())
            raise
        return channel

    def _commit_prefetch(self) -> int:
        """The prefetch of a channel opening now, counted as what the session may hold."""
        prefetch = self._prefetch()
        self._share.slots += prefetch
        return prefetch

    def _prefetch(self) -> int:
        """Per channel: amqp.prefetch_count's share, lowered so that as many messages of the
        typical size as all channels may hold fit in the byte budget's room, less what the
        other queues' prefetch may still bring. Fixed for the session."""
        size = self._typical_size or ASSUMED_SIZE
        fitting = self._budget.prefetch_room(self._share) // (size * self._channels_wanted)
        return max(1, min(self._per_channel, fitting))

    def _on_cancelled_by_broker(self, _frame: object) -> None:
        # asyncio side: RabbitMQ cancelled a consumer (its queue was deleted, say).
        self.interrupt("consumer cancelled by RabbitMQ")

    def interrupt(self, reason: str) -> None:
        """End the current session soon; the next one declares and consumes again."""
        self._interrupted = reason

    def release(self, reason: str, pause: float) -> None:
        """Hand every prefetched message back to RabbitMQ (the session ends, its channels
        close) and consume again only after pause seconds, so other nodes get them."""
        self._paused_until = trio.current_time() + pause
        self.interrupt(reason)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        # asyncio side (one task per message, made by aio-pika): hand over to the trio buffer,
        # or park the delivery when it does not fit the node's buffers.
        if not self._in_session:
            return  # the session ended: its channel is closing and RabbitMQ requeues the message
        size = len(message.body)
        self._typical_size = (
            size if not self._typical_size else (self._typical_size * 7 + size) // 8
        )
        self._budget.claim(self._share, size)  # the room kept for it, if it was handed back
        alone = self.buffer.waiting > 0 or len(self.buffer) == 0
        acks = self._acks_of(message)
        if self._budget.admits(size, alone=alone):
            self.buffer.put(Buffered(message, time.monotonic(), size=size, acks=acks))
        elif message.delivery_tag is not None:
            with contextlib.suppress(*BROKER_ERRORS):  # its channel closed: it is requeued
                self._parked.append(
                    Parked(message.channel, message.delivery_tag, size, time.monotonic(), acks)
                )
            self._budget.hand_out()  # the room it leaves may fit an older one

    def _acks_of(self, message: aio_pika.abc.AbstractIncomingMessage) -> Acks | None:
        """The acks of the message's channel (one a robust connection restored included); None
        once that channel closed (RabbitMQ requeues the message by itself)."""
        try:
            channel = message.channel
        except BROKER_ERRORS:
            return None
        acks = self._acks.get(id(channel))
        if acks is None:
            acks = self._acks[id(channel)] = Acks(channel)
        return acks

    async def _watch(self, channels: list[Channel]) -> None:
        """Return when idle or when a channel dies; meanwhile give back what was held too long,
        and hand back parked deliveries once they fit."""
        while not self._idle():
            if any(c.amqp.is_closed or c.generation != self.broker.generation for c in channels):
                logger.info("consumer %s: channel lost", self.queue)
                return
            if self._interrupted:
                logger.info("consumer %s: %s", self.queue, self._interrupted)
                return
            cutoff = time.monotonic() - self._hold_seconds
            for item in self.buffer.take_older_than(cutoff):
                await aio.call(item.settle, ack=False)
                self._metrics.given_back.labels(self.queue).inc()
            leaving = self._unpark(cutoff)
            if leaving:
                await aio.call(give_back, leaving)
            self._metrics.buffered_bytes.labels(self.queue).set(self.buffer.bytes)
            with trio.move_on_after(SWEEP_SECONDS):
                await self._share.wait_due()

    def _unpark(self, cutoff: float) -> list[Parked]:
        """The parked deliveries to hand back now: those the budget made due (their turn in the
        node's order came and the room covers them), one more when this queue's buffer is
        empty (it comes back alone), and any parked before cutoff (so RabbitMQ's
        consumer_timeout never sees it). Each one's bytes are reserved until it arrives."""
        self._budget.hand_out()  # reservations that lapsed left room
        leaving = self._share.take_due()
        while self._parked:
            alone = not leaving and not len(self.buffer)
            if not alone and self._parked[0].parked_at >= cutoff:
                break
            parked = self._parked.popleft()
            self._budget.reserve(self._share, parked.size)
            leaving.append(parked)
        return leaving

    def _idle(self) -> bool:
        now = time.monotonic()
        return (
            self.buffer.waiting == 0
            and now - self._last_demand > self._idle_seconds
            and not self.handing_out(now)
        )

    @property
    def last_demand(self) -> float:
        """When (time.monotonic) a subscriber last asked for or got a message of this queue."""
        return self._last_demand


async def settle(message: aio_pika.abc.AbstractIncomingMessage, *, ack: bool) -> bool:
    """(asyncio side) Ack, or requeue, one AMQP delivery within SETTLE_TIMEOUT; False when the
    channel is gone (RabbitMQ then redelivers the message by itself)."""
    try:
        async with asyncio.timeout(SETTLE_TIMEOUT):
            if ack:
                await message.ack()
            else:
                await message.nack(requeue=True)
        return True
    except SETTLE_ERRORS as error:
        logger.debug("settling a delivery failed: %s", describe(error))
        return False


async def give_back(parked: list[Parked]) -> None:
    """(asyncio side) Hand parked deliveries back to RabbitMQ, in order."""
    for delivery in parked:
        await delivery.give_back()


async def close_after_failed_call(channel: Channel) -> None:
    """Close a channel whose basic.consume failed. A call that timed out or was cancelled
    makes aiormq send Channel.Close itself; closing the channel at once would then stop its
    frame reader before RabbitMQ's Close-Ok, and the deliveries still on their way would fill
    the channel's frame queue and block the connection's one reader for good (no reply, no
    heartbeat, on any channel). So wait for that Close-Ok first, then close what is still open."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await aio.call(_wait_closed, channel.amqp)
    await channel.close()


async def _wait_closed(channel: aio_pika.abc.AbstractChannel) -> None:
    """(asyncio side) Wait until the channel has closed, however it ends."""
    await channel.closed()


class Consumers:
    """The running QueueConsumers of this node, started on first demand, at most
    amqp.max_consumed_queues at once."""

    def __init__(
        self,
        broker: Broker,
        config: AmqpConfig,
        metrics: Metrics,
        supervisor: Supervisor,
        declare: Declare,
        nursery: trio.Nursery,
    ) -> None:
        self._broker = broker
        self._declare = declare
        self._config = config
        self._metrics = metrics
        self._supervisor = supervisor
        self._nursery = nursery
        self._running: dict[str, QueueConsumer] = {}
        self._budget = ByteBudget(config.buffer_max_bytes)
        self._refused: dict[str, tuple[float, CallError]] = {}  # queue -> (when, refusal)
        self._starting = trio.Lock()

    async def take(self, queue: str) -> Buffered:
        """(asyncio side) The next message of queue from this node's buffer; waits until one
        arrives, starting the queue's consumer when it is not running."""
        while True:
            consumer = self._running.get(queue)
            if consumer is None or not consumer.active:
                consumer = await aio.run_trio(self._start)(queue)
            try:
                return await consumer.take()
            except ConsumerStopped:
                if consumer.refusal is not None:
                    raise consumer.refusal from None
                continue

    async def started(self, queue: str) -> None:
        """(asyncio side) Start queue's consumer unless it runs."""
        consumer = self._running.get(queue)
        if consumer is None or not consumer.active:
            await aio.run_trio(self._start)(queue)

    def take_ready(self, queue: str, most: int, room: int) -> list[Buffered]:
        """(asyncio side) Up to most messages of queue already in this node's buffer, their
        bodies within room bytes; no wait."""
        consumer = self.get(queue)
        taken: list[Buffered] = []
        while consumer is not None and consumer.active and len(taken) < most:
            head = consumer.buffer.peek()
            if head is None or head.size > room:
                break
            room -= head.size
            taken.append(consumer.take_now())
        return taken

    def running(self) -> list[QueueConsumer]:
        return [c for c in self._running.values() if not c.stopped]

    def get(self, queue: str) -> QueueConsumer | None:
        consumer = self._running.get(queue)
        return consumer if consumer is not None and not consumer.stopped else None

    def buffered(self) -> dict[str, int]:
        """Messages held in the local buffer, per queue."""
        return {queue: len(c.buffer) for queue, c in self._running.items()}

    def buffered_bytes(self) -> dict[str, int]:
        """Body bytes held in the local buffer, per queue (all of them together at most
        amqp.buffer_max_bytes, plus one message per queue)."""
        return {queue: c.buffer.bytes for queue, c in self._running.items()}

    async def _start(self, queue: str) -> QueueConsumer:
        """Start consuming queue: declared first (so a refusal retires nothing), then, at
        amqp.max_consumed_queues, once a retired queue's channels are closed."""
        self._raise_recent_refusal(queue)
        try:
            await self._declare(queue)
        except (FailedPrecondition, NotFound) as refusal:
            self._refused[queue] = (time.monotonic(), refusal)
            raise
        with trio.move_on_after(ROOM_TIMEOUT):
            while True:
                async with self._starting:
                    consumer = self._running.get(queue)
                    if consumer is not None and consumer.active:
                        return consumer  # another caller started it meanwhile
                    retiring = self._make_room()
                    if retiring is None:
                        return await self._start_now(queue)
                await retiring.finished.wait()
        raise ResourceExhausted("no queue's consumers stopped in time to make room; try again")

    async def _start_now(self, queue: str) -> QueueConsumer:
        consumer = self._running[queue] = QueueConsumer(
            self._broker,
            queue,
            self._config,
            self._metrics,
            self._supervisor,
            self._declare,
            self._budget,
        )
        await self._nursery.start(self._run, consumer)
        return consumer

    def _raise_recent_refusal(self, queue: str) -> None:
        now = time.monotonic()
        for name, (when, _) in list(self._refused.items()):
            if now - when > REFUSAL_MEMORY:
                del self._refused[name]
        if queue in self._refused:
            raise self._refused[queue][1]

    def _make_room(self) -> QueueConsumer | None:
        """None when one more queue may be consumed; else the consumer that is stopping to
        make room (retiring the one nobody wanted for longest); RESOURCE_EXHAUSTED when every
        consumed queue is wanted."""
        alive = [c for c in self._running.values() if not c.stopped]
        if len(alive) < self._config.max_consumed_queues:
            return None
        retiring = [c for c in alive if c.retiring]
        if retiring:
            return retiring[0]
        now = time.monotonic()
        idle = [c for c in alive if c.retirable(now)]
        if not idle:
            raise ResourceExhausted(
                f"this node already consumes {len(alive)} queues, each wanted by a subscriber "
                "within the last seconds (amqp.max_consumed_queues); try again later or on "
                "another node"
            )
        oldest = min(idle, key=lambda c: c.last_demand)
        oldest.retire()
        return oldest

    async def _run(
        self,
        consumer: QueueConsumer,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await consumer.run(task_status=task_status)
        finally:
            if consumer.refusal is not None:
                self._refused[consumer.queue] = (time.monotonic(), consumer.refusal)
            if self._running.get(consumer.queue) is consumer:
                del self._running[consumer.queue]
