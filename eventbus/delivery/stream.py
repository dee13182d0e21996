"""StreamingPull sessions: a consumer on an AMQP channel of its own, its deliveries held unacked.

A stream holds what it handed out as unacked AMQP deliveries on its own channel, with prefetch
max_outstanding_messages: RabbitMQ itself bounds what the stream holds, and when the stream ends,
breaks, or its daemon dies, RabbitMQ puts every unacked message back in the queue at once. An ack
is an AMQP ack (one `multiple` ack for a run of the oldest), so the common path records nothing
per message. A nack or a missed deadline publishes the next attempt (redelivery.Redelivery)
before the held delivery is acked.

A delivery may be held HOLD_LIMIT at most, deadline extensions included: RabbitMQ closes a
channel whose delivery stays unacked past its consumer_timeout (30 min by default), which would
hand every message of the stream back at once.

Everything here runs on the asyncio side, in the gRPC handler's task and the tasks it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aio_pika.abc
import aiormq
import aiormq.abc

from ..backends.broker import BROKER_ERRORS, CALL_TIMEOUT, Broker, check_channel_count
from ..backends.retry import describe
from ..errors import CallError, ResourceExhausted, Unavailable
from ..ops.metrics import Metrics
from .envelope import Envelope
from .redelivery import Failure, Redelivery

logger = logging.getLogger(__name__)

HOLD_LIMIT = 25 * 60.0  # seconds; below RabbitMQ's default consumer_timeout
MAX_DEADLINE = 600  # seconds, per request
MAX_SEND_BATCH = 500
MAX_SEND_BYTES = 3 * 1024 * 1024  # of bodies in one response: gRPC clients take 4 MiB by default
UNREAD_LIMIT = 30.0  # seconds, at least: a stream whose client reads nothing for longer ends
SWEEP_EVERY = 0.25  # seconds between looks for missed deadlines
MAX_PENDING_INVALID = 10_000  # ids reported back at once; more are dropped
SETTLING_GRACE = 5.0  # seconds a closing stream waits for nacks being published
CLOSE_WAIT = 10.0  # seconds a closing stream waits for its channel to close


@dataclass(slots=True)
class Lease:
    """One delivery held by a stream."""

    tag: int
    envelope: Envelope
    ack_id: str
    received: float  # epoch seconds
    deadline: float  # epoch seconds; counted from when it is sent
    sent: bool = False


class _Incoming:
    """An aiormq delivery seen as Envelope.from_amqp reads a message."""

    __slots__ = ("body", "headers", "message_id", "timestamp")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        self.body = message.body
        self.headers = properties.headers
        self.message_id = properties.message_id
        self.timestamp = properties.timestamp


class Streams:
    """The node's open streams by token, so unary calls on this node reach their deliveries."""

    def __init__(self, most: int) -> None:
        self._open: dict[str, StreamSession] = {}
        self._most = most
        self._slots = 0  # streams open or opening

    def take_slot(self) -> None:
        """Count a stream about to open; ResourceExhausted past server.max_streaming_pulls."""
        if self._slots >= self._most:
            raise ResourceExhausted(
                f"this node serves {self._most} StreamingPulls already "
                "(server.max_streaming_pulls); retry later or on another node"
            )
        self._slots += 1

    def give_slot(self) -> None:
        self._slots -= 1

    def add(self, session: StreamSession) -> None:
        self._open[session.token] = session

    def remove(self, session: StreamSession) -> None:
        self._open.pop(session.token, None)

    def revoke(self, refusal: Callable[[StreamSession], CallError | None]) -> int:
        """End every open stream for which refusal gives an error (its identity was removed,
        or may no longer read its queue): the error is the stream's status. Returns how many."""
        ended = 0
        for session in list(self._open.values()):
            error = refusal(session)
            if error is not None:
                session.revoke(error)
                ended += 1
        return ended

    def owner(self, ack_id: str) -> StreamSession | None:
        token, _, _ = ack_id.partition(".")
        return self._open.get(token)

    def __len__(self) -> int:
        return len(self._open)

    def held(self) -> int:
        return sum(len(s.leases) for s in self._open.values())


def is_stream_ack_id(ack_id: str) -> bool:
    """Whether ack_id names a stream's delivery (token.tag), not a recorded one (a UUID)."""
    token, dot, tag = ack_id.partition(".")
    return bool(dot) and len(token) == 16 and tag.isdigit()


class StreamSession:
    """One stream's consumer and the deliveries it holds."""

    def __init__(
        self,
        queue: str,
        ack_deadline: float,
        redelivery: Redelivery,
        metrics: Metrics,
    ) -> None:
        self.queue = queue
        self.topic = ""  # the topic its group queue is bound to, if any
        self.identity = ""  # the name of the identity that opened it
        self.token = secrets.token_hex(8)
        self.ack_deadline = ack_deadline
        self.leases: dict[int, Lease] = {}
        self._redelivery = redelivery
        self._metrics = metrics
        self._ready: list[Lease] = []
        self._invalid: list[str] = []
        self._wake = asyncio.Event()
        self._settling: set[int] = set()
        self._retries: set[asyncio.Task[None]] = set()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._amqp: aiormq.Channel | None = None
        self._cancelled = asyncio.get_running_loop().create_future()
        self._revoked: asyncio.Future[CallError] = asyncio.get_running_loop().create_future()
        self._closing: asyncio.Future[None] | None = None

    async def open(self, broker: Broker, max_outstanding: int) -> None:
        """Open the stream's channel and start consuming (queue declared already). The opening
        runs as a task of its own that nothing cancels (see close); when the caller leaves or
        RabbitMQ does not answer within CALL_TIMEOUT, the channel is closed once it is open."""
        connection = broker.connection
        check_channel_count(connection)
        opening = asyncio.ensure_future(self._open(connection, max_outstanding))
        try:
            await asyncio.wait([opening], timeout=CALL_TIMEOUT)
        except BaseException:
            opening.add_done_callback(self._close_soon)  # also when it is open already
            raise
        if not opening.done():
            opening.add_done_callback(self._close_soon)
            raise Unavailable(f"RabbitMQ did not start consuming {self.queue!r} within 5 s")
        error = opening.exception()
        if error is not None:
            await self.close()
            if isinstance(error, BROKER_ERRORS):
                raise Unavailable(
                    f"RabbitMQ could not start consuming {self.queue!r}: {describe(error)}"
                ) from None
            raise error

    async def _open(self, connection: aio_pika.abc.AbstractConnection, prefetch: int) -> None:
        self._channel = await connection.channel(publisher_confirms=False)
        amqp = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        self._amqp = amqp
        await amqp.basic_qos(prefetch_count=prefetch)
        amqp.on_consumer_cancel_callbacks.add(self._on_cancelled_by_broker)
        await amqp.basic_consume(self.queue, self._on_delivery)

    def _close_soon(self, _opening: asyncio.Future[None]) -> None:
        self._closing = self._closing or asyncio.ensure_future(self._close())

    def revoke(self, error: CallError) -> None:
        """End the stream with error (from either side of the seam: it only queues a callback)."""
        self._revoked.get_loop().call_soon(self._revoke_now, error)

    def _revoke_now(self, error: CallError) -> None:
        if not self._revoked.done():
            self._revoked.set_result(error)

    async def revoked(self) -> None:
        """Raise the error the stream was revoked with, once it is."""
        raise await asyncio.shield(self._revoked)

    async def closed(self) -> str:
        """Wait until RabbitMQ closes the channel (or its connection) or cancels the consumer
        (its queue was deleted, say); returns why."""
        assert self._amqp is not None
        closing = asyncio.ensure_future(asyncio.shield(self._amqp.closing))
        try:
            await asyncio.wait([closing, self._cancelled], return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
        if self._cancelled.done():
            return "RabbitMQ cancelled the consumer: its queue was deleted"
        error = None if closing.cancelled() else closing.exception()
        return describe(error) if error is not None else "the channel closed"

    def _on_cancelled_by_broker(self, _frame: object) -> None:
        if not self._cancelled.done():
            self._cancelled.set_result(None)

    async def _on_delivery(self, message: aiormq.abc.DeliveredMessage) -> None:
        # aiormq runs this as a task of its own per delivery; it never waits.
        tag = message.delivery_tag
        if tag is None:
            return
        envelope = Envelope.from_amqp(_Incoming(message))  # type: ignore[arg-type]
        now = time.time()
        if envelope.expired(now):  # past its TTL: dropped, never handed out
            self._ack_now([tag])
            self._metrics.expired.labels(self.queue).inc()
            return
        lease = Lease(tag, envelope, f"{self.token}.{tag}", now, now + self.ack_deadline)
        self.leases[tag] = lease
        self._ready.append(lease)
        self._wake.set()

    async def next_batch(self) -> tuple[list[Lease], list[str]]:
        """Wait for deliveries to send or invalid ids to report. No time is spent waiting for
        more (2 ms of it cost 2.7 ms of latency): under load, what arrives while a response is
        being sent makes the next one; one turn of the loop lets deliveries already read join."""
        while not self._ready and not self._invalid:
            self._wake.clear()
            await self._wake.wait()
        if self._ready and len(self._ready) < MAX_SEND_BATCH:
            await asyncio.sleep(0)
        batch = self._take_ready()
        invalid, self._invalid = self._invalid, []
        self._count_sent(batch)
        return batch, invalid

    def _take_ready(self) -> list[Lease]:
        """The next deliveries to send (those still held), within MAX_SEND_BATCH and
        MAX_SEND_BYTES (one at least); their deadlines start now."""
        batch: list[Lease] = []
        size, now, taken = 0, time.time(), 0
        for lease in self._ready:
            body = len(lease.envelope.body)
            if len(batch) == MAX_SEND_BATCH or (batch and size + body > MAX_SEND_BYTES):
                break
            taken += 1
            if self.leases.get(lease.tag) is lease:
                lease.sent, lease.deadline = True, now + self.ack_deadline
                batch.append(lease)
                size += body
        del self._ready[:taken]
        return batch

    def _count_sent(self, batch: list[Lease]) -> None:
        if batch:
            self._metrics.delivered.labels(self.queue).inc(len(batch))
            again = sum(1 for lease in batch if lease.envelope.attempt > 1)
            if again:
                self._metrics.redelivered.labels(self.queue).inc(again)

    def report_invalid(self, ack_ids: Iterable[str]) -> None:
        """Ids to send back as invalid_ack_ids with the next response."""
        room = MAX_PENDING_INVALID - len(self._invalid)
        self._invalid.extend(list(ack_ids)[: max(0, room)])
        if self._invalid:
            self._wake.set()

    def _take(self, ack_ids: Iterable[str]) -> tuple[list[Lease], list[str]]:
        """The current leases these ids name, removed; and the ids that name none."""
        found, invalid = [], []
        for ack_id in ack_ids:
            lease = self.leases.pop(_tag_of(ack_id, self.token), None)
            if lease is None:
                invalid.append(ack_id)
            else:
                found.append(lease)
        return found, invalid

    def ack(self, ack_ids: Iterable[str]) -> list[str]:
        """Ack the deliveries named; returns the ids that name no current delivery."""
        found, invalid = self._take(ack_ids)
        if found:
            self._ack_now([lease.tag for lease in found])
            self._metrics.settlements_received.labels("ack").inc(len(found))
            self._metrics.acked.labels(self.queue).inc(len(found))
        return invalid

    def nack(self, ack_ids: Iterable[str], failure: Failure) -> list[str]:
        """Bring the deliveries named back as failure says; returns the ids that name no
        current delivery."""
        found, invalid = self._take(ack_ids)
        if found:
            self._retry(found, failure)
            self._metrics.settlements_received.labels("nack").inc(len(found))
            self._metrics.nacked.labels(self.queue).inc(len(found))
        return invalid

    def modify(self, ack_ids: Iterable[str], seconds: Mapping[str, int] | int) -> list[str]:
        """Set the deadline of the deliveries named to seconds from now (0: nack now, with the
        queue's backoff); returns the ids that name no current delivery."""
        now, invalid, nacked = time.time(), [], []
        for ack_id in ack_ids:
            wanted = seconds if isinstance(seconds, int) else seconds[ack_id]
            lease = self.leases.get(_tag_of(ack_id, self.token))
            if lease is None:
                invalid.append(ack_id)
            elif wanted == 0:
                nacked.append(ack_id)
            else:
                lease.deadline = min(now + min(wanted, MAX_DEADLINE), lease.received + HOLD_LIMIT)
        return invalid + self.nack(nacked, Failure("nack"))

    async def expire(self) -> None:
        """Forever: deliveries past their deadline come back as missed deadlines. Unavailable
        when the client has left deliveries unread for long (they go back to the queue as the
        stream ends, no attempt counted)."""
        unread_limit = max(UNREAD_LIMIT, self.ack_deadline)
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.time()
            if any(not lease.sent and lease.received < now - unread_limit for lease in self._ready):
                raise Unavailable(
                    f"the client read nothing of its stream for {unread_limit:g} s; "
                    "its messages went back to the queue"
                )
            late = [lease for lease in self.leases.values() if lease.sent and lease.deadline <= now]
            for lease in late:
                del self.leases[lease.tag]
            if late:
                self._retry(late, Failure("deadline"))

    def _retry(self, leases: list[Lease], failure: Failure) -> None:
        tags = [lease.tag for lease in leases]
        self._settling.update(tags)
        task = asyncio.ensure_future(self._publish_next_attempt(leases, failure))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _publish_next_attempt(self, leases: list[Lease], failure: Failure) -> None:
        """Publish each lease's next attempt, then ack it; one that could not be published is
        handed back to RabbitMQ as it is (requeued at once)."""
        try:
            done = await self._redelivery.redeliver(
                self.queue, [lease.envelope for lease in leases], failure
            )
        except Exception as error:
            logger.info(
                "stream %s: a retry could not be published: %s", self.queue, describe(error)
            )
            done = [False] * len(leases)
        except BaseException:
            self._settling.difference_update(lease.tag for lease in leases)
            raise  # cancelled: the channel closes, and RabbitMQ requeues them
        # The failed ones go back first, while the others still count as held: a `multiple`
        # ack of the others must not cover them.
        self._requeue([lease.tag for lease, ok in zip(leases, done, strict=True) if not ok])
        self._settling.difference_update(lease.tag for lease in leases)
        self._ack_now([lease.tag for lease, ok in zip(leases, done, strict=True) if ok])
        self._metrics.republished.labels(self.queue).inc(sum(done))

    def _ack_now(self, tags: list[int]) -> None:
        """AMQP-ack tags: one `multiple` ack for those below every delivery still held or being
        settled, one each for the rest. A closed channel already gave them back."""
        if self._amqp is None or self._amqp.is_closed:
            return
        oldest = min(self._held_tags(), default=None)
        below = [tag for tag in tags if oldest is None or tag < oldest]
        with contextlib.suppress(*BROKER_ERRORS, RuntimeError):
            if below:
                self._send(self._amqp.basic_ack(max(below), multiple=True, wait=False))
            for tag in tags:
                if oldest is not None and tag > oldest:
                    self._send(self._amqp.basic_ack(tag, wait=False))

    def _held_tags(self) -> Iterable[int]:
        yield from self.leases
        yield from self._settling

    def _requeue(self, tags: list[int]) -> None:
        if self._amqp is None or self._amqp.is_closed:
            return
        with contextlib.suppress(*BROKER_ERRORS, RuntimeError):
            for tag in tags:
                self._send(self._amqp.basic_reject(tag, requeue=True, wait=False))

    def _send(self, frame_write: Any) -> None:
        """Write a frame without waiting for it (aiormq queues it; order is kept)."""
        task = asyncio.ensure_future(frame_write)
        task.add_done_callback(_quietly)

    async def close(self) -> None:
        """Close the channel: RabbitMQ puts every delivery still held back in the queue. The
        closing runs as a task of its own that nothing cancels: a Channel.Close cancelled
        midway makes aiormq reuse the channel's number before RabbitMQ's Close-Ok, and RabbitMQ
        then closes the whole connection, every other stream and consumer with it. Waits up to
        CLOSE_WAIT for it (also when the caller is cancelled, the closing goes on)."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.wait([self._closing], timeout=CLOSE_WAIT)

    async def _close(self) -> None:
        """Wait up to SETTLING_GRACE for retries being published (so a message is not requeued
        beside its next attempt), then close the channel."""
        if self._retries:
            await asyncio.wait(list(self._retries), timeout=SETTLING_GRACE)
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            try:
                await channel.close()
            except BROKER_ERRORS as error:
                logger.debug("stream %s: closing its channel: %s", self.queue, describe(error))
        self.leases.clear()


def _tag_of(ack_id: str, token: str) -> int:
    """The delivery tag an ack id of this stream names; 0 (never a tag) for any other id."""
    prefix, _, tag = ack_id.partition(".")
    if prefix != token or not tag.isdigit() or len(tag) > 20:
        return 0
    return int(tag)


def _quietly(task: asyncio.Future[Any]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        logger.debug("stream: a frame could not be written: %s", describe(error))
