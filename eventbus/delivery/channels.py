"""The channels publishing uses: one shared pool of confirm channels and a few channels for
probes, on the connection that publishes; a few channels for declarations on the one that never
does (so declaring goes on while RabbitMQ blocks publishers); and what has been declared on the
current connections.

A declaring or probing channel serves one call at a time, and one whose call failed (refused,
timed out, its AMQP method cancelled midway) is closed and never handed out again: aiormq may be
closing it still, and a frame sent on it then would make RabbitMQ close the whole connection.

Every call here is on the asyncio side of the seam and bounded by PUBLISH_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar, cast

import aio_pika.abc
import aiormq
import aiormq.exceptions

from ..backends import broker
from ..backends.broker import BROKER_ERRORS, CLOSE_TIMEOUT, Broker, check_channel_count
from ..backends.retry import describe
from ..errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from . import bulk

logger = logging.getLogger(__name__)

T = TypeVar("T")

PUBLISH_TIMEOUT = 5.0
DECLARED_MAX = 10_000  # declarations remembered at once; the least recently used is forgotten
DECLARING_CHANNELS = 4
# RabbitMQ closes a channel with these when a command on it was refused (a message it does not
# take, a target that is missing, say); the other messages in flight on that channel are lost
# with it, through no fault of their own.
REFUSALS: tuple[type[BaseException], ...] = (
    *broker.REFUSALS,
    aiormq.exceptions.ChannelNotFoundEntity,
)


# RabbitMQ's 404 for a queue that exists but cannot be reached now (rabbit_amqqueue's "absent"
# reasons): the node of a classic queue is down, its process stopped, crashed or timing out.
# It is NOT_FOUND in AMQP, but the queue is there: the caller is to retry, not give up.
ABSENT_QUEUE = (
    "is down or inaccessible",
    "process is stopped by supervisor",
    "has crashed and failed to restart",
    "due to timeout",
    "may be stopping or being demoted",
)


def queue_absent(error: BaseException) -> bool:
    """Whether a ChannelNotFoundEntity says a queue that exists is out of reach for now (its
    node down, say), rather than that it does not exist."""
    return isinstance(error, aiormq.exceptions.ChannelNotFoundEntity) and any(
        reason in str(error) for reason in ABSENT_QUEUE
    )


# Closing a channel that failed: it may be closed already, or its connection gone or stuck.
CLOSE_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, TimeoutError, RuntimeError)


class Returned(Exception):
    """RabbitMQ returned a mandatory message: no queue of that name (any more)."""


class ChannelRefused(Exception):
    """RabbitMQ closed the channel a message was on, refusing a command on it."""


class ChannelPool:
    """The shared confirm channels of one connection generation, on the connection that
    publishes, as aiormq channels (asyncio side). A channel that closed is replaced in its
    place, so a target keeps its channels.

    So is a channel on which RabbitMQ nacked a publish (closed once its other confirms had
    their time). RabbitMQ 3.10 keeps, per channel and quorum queue, the leader it found when
    the channel first published to the queue; should that leader's node be down then (the bus
    reconnects within milliseconds, the queue elects a new leader within seconds), the publish
    is nacked and the channel never looks again: every later publish on it to that queue is
    nacked until the old node is back. A new channel asks the queue's record anew.
    """

    def __init__(self, broker: Broker, size: int) -> None:
        self._broker = broker
        self.size = size
        self._channels: list[aio_pika.abc.AbstractChannel | None] = [None] * size
        self._underlays: list[aiormq.Channel | None] = [None] * size
        self._generation = -1
        self._lock = asyncio.Lock()

    async def channels(self) -> list[aiormq.Channel]:
        """Every channel of the pool, open (BrokerUnavailable while there is no connection)."""
        if self._generation != self._broker.generation or not self._all_open():
            async with self._lock:
                await self._refill()
        return cast(list[aiormq.Channel], list(self._underlays))

    def _all_open(self) -> bool:
        return all(c is not None and not c.is_closed for c in self._channels) and not any(
            u is not None and bulk.nacked(u) for u in self._underlays
        )

    async def _refill(self) -> None:
        connection = self._broker.publishing  # BrokerUnavailable while there is none
        if self._generation != self._broker.generation:
            self._channels = [None] * self.size
            self._generation = self._broker.generation
        for i, channel in enumerate(self._channels):
            nacked = self._underlays[i]
            if channel is not None and nacked is not None and bulk.nacked(nacked):
                logger.info("RabbitMQ nacked a publish on channel %d: replacing it", nacked.number)
                close_soon(channel)
                channel = None
            if channel is None or channel.is_closed:
                channel = await open_channel(connection)
                underlay = await channel.get_underlay_channel()
                self._channels[i], self._underlays[i] = channel, cast(aiormq.Channel, underlay)


class Declarer:
    """Channels for declarations (on the connection that never publishes) or for probes (on the
    one that does), each used by one call at a time (asyncio side)."""

    def __init__(self, broker: Broker, size: int, *, publishing: bool = False) -> None:
        self._broker = broker
        self._publishing = publishing
        self._idle: list[tuple[int, aio_pika.abc.AbstractChannel]] = []
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
        """A channel for one call; should the call fail, the channel is closed, not reused."""
        async with self._slots:
            generation = self._broker.generation
            channel = self._take(generation)
            if channel is None:
                channel = await open_channel(self._connection())
            try:
                yield channel
            except BaseException:
                close_soon(channel)
                raise
            if not channel.is_closed and generation == self._broker.generation:
                self._idle.append((generation, channel))

    def _connection(self) -> aio_pika.abc.AbstractConnection:
        return self._broker.publishing if self._publishing else self._broker.connection

    def _take(self, generation: int) -> aio_pika.abc.AbstractChannel | None:
        while self._idle:
            born, channel = self._idle.pop()
            if born == generation and not channel.is_closed:
                return channel
        return None


class Declared:
    """Declarations known to hold on the current connection: at most DECLARED_MAX, the least
    recently used forgotten first; all forgotten on a reconnect."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._known: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._generation = broker.generation

    def __contains__(self, declaration: tuple[str, ...]) -> bool:
        if self._generation != self._broker.generation:
            self._known.clear()  # a reconnect: the broker may have lost what it had
            self._generation = self._broker.generation
        if declaration not in self._known:
            return False
        self._known.move_to_end(declaration)
        return True

    def add(self, declaration: tuple[str, ...]) -> None:
        self._known[declaration] = None
        self._known.move_to_end(declaration)
        while len(self._known) > DECLARED_MAX:
            self._known.popitem(last=False)

    def discard(self, declaration: tuple[str, ...]) -> None:
        self._known.pop(declaration, None)

    def __len__(self) -> int:
        return len(self._known)


_closing: set[asyncio.Task[Any]] = set()  # channels being closed, kept from the collector


def close_soon(channel: aio_pika.abc.AbstractChannel) -> None:
    """(asyncio side) Close a channel in the background, within CLOSE_TIMEOUT."""
    task = asyncio.ensure_future(_close_quietly(channel))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


async def _close_quietly(channel: aio_pika.abc.AbstractChannel) -> None:
    """A call that timed out or was cancelled makes aiormq close the channel itself; closing it
    again before RabbitMQ's Close-Ok would stop its frame reader while frames (a returned probe,
    say) may still arrive, and a full frame queue blocks the connection's one reader. So give
    that close its time first."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await channel.closed()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await channel.close()
    except CLOSE_ERRORS as error:
        logger.debug("closing a failed channel: %s", describe(error))


async def open_channel(
    connection: aio_pika.abc.AbstractConnection,
) -> aio_pika.abc.AbstractChannel:
    """(asyncio side) A new confirm channel, within PUBLISH_TIMEOUT; Unavailable also for the
    bare RuntimeError aiormq raises when the connection closed before its callback ran,
    ResourceExhausted near RabbitMQ's channel_max."""
    check_channel_count(connection)
    try:
        return await bounded("opening a channel", connection.channel(publisher_confirms=True))
    except RuntimeError as error:
        reason = describe(error)
        raise Unavailable(f"RabbitMQ is unavailable (opening a channel): {reason}") from None


async def bounded(what: str, call: Awaitable[T], seconds: float = PUBLISH_TIMEOUT) -> T:
    """(asyncio side) Await a broker call for at most seconds; broker failures become
    Unavailable, a refusal by RabbitMQ itself FailedPrecondition (NotFound for a missing
    entity; Unavailable for one that exists on a node down, see queue_absent), one by the
    client library (a name it does not take) InvalidArgument."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except (Returned, ChannelRefused):
        raise
    except aiormq.exceptions.ChannelNotFoundEntity as error:
        if queue_absent(error):
            raise Unavailable(f"RabbitMQ is unavailable ({what}): {describe(error)}") from None
        raise NotFound(f"RabbitMQ refused {what}: {describe(error)}") from None
    except REFUSALS as error:
        raise FailedPrecondition(f"RabbitMQ refused {what}: {describe(error)}") from None
    except TimeoutError:
        raise Unavailable(f"RabbitMQ did not confirm {what} within {seconds:g} s") from None
    except BROKER_ERRORS as error:
        raise Unavailable(f"RabbitMQ is unavailable ({what}): {describe(error)}") from None
    except ValueError as error:  # what pamqp raises for a name or value it does not take
        raise InvalidArgument(f"RabbitMQ's client cannot send {what}: {error}") from None
