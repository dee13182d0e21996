"""The channels publishing uses: one shared pool of confirm channels, a few channels for
declarations and probes, and what has been declared on the current connection.

Every call here is on the asyncio side of the seam and bounded by PUBLISH_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar, cast

import aio_pika.abc
import aiormq
import aiormq.exceptions

from . import broker
from .broker import BROKER_ERRORS, Broker
from .errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from .retry import describe

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


class Returned(Exception):
    """RabbitMQ returned a mandatory message: no queue of that name (any more)."""


class ChannelRefused(Exception):
    """RabbitMQ closed the channel a message was on, refusing a command on it."""


class ChannelPool:
    """The shared confirm channels of one connection generation, as aiormq channels (asyncio
    side). A channel that closed is replaced in its place, so a target keeps its channels."""

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
        return all(c is not None and not c.is_closed for c in self._channels)

    async def _refill(self) -> None:
        connection = self._broker.connection  # BrokerUnavailable while there is none
        if self._generation != self._broker.generation:
            self._channels = [None] * self.size
            self._generation = self._broker.generation
        for i, channel in enumerate(self._channels):
            if channel is None or channel.is_closed:
                channel = await open_channel(connection)
                underlay = await channel.get_underlay_channel()
                self._channels[i], self._underlays[i] = channel, cast(aiormq.Channel, underlay)


class Declarer:
    """Channels for declarations and probes, each used by one at a time (asyncio side)."""

    def __init__(self, broker: Broker, size: int) -> None:
        self._broker = broker
        self._idle: list[tuple[int, aio_pika.abc.AbstractChannel]] = []
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
        async with self._slots:
            generation = self._broker.generation
            channel = self._take(generation)
            if channel is None:
                channel = await open_channel(self._broker.connection)
            try:
                yield channel
            finally:
                if not channel.is_closed and generation == self._broker.generation:
                    self._idle.append((generation, channel))

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


async def open_channel(
    connection: aio_pika.abc.AbstractConnection,
) -> aio_pika.abc.AbstractChannel:
    """(asyncio side) A new confirm channel, within PUBLISH_TIMEOUT; Unavailable also for the
    bare RuntimeError aiormq raises when the connection closed before its callback ran."""
    try:
        return await bounded("opening a channel", connection.channel(publisher_confirms=True))
    except RuntimeError as error:
        reason = describe(error)
        raise Unavailable(f"RabbitMQ is unavailable (opening a channel): {reason}") from None


async def bounded(what: str, call: Awaitable[T], seconds: float = PUBLISH_TIMEOUT) -> T:
    """(asyncio side) Await a broker call for at most seconds; broker failures become
    Unavailable, a refusal by RabbitMQ itself FailedPrecondition (NotFound for a missing
    entity), one by the client library (a name it does not take) InvalidArgument."""
    try:
        async with asyncio.timeout(seconds):
            return await call
    except (Returned, ChannelRefused):
        raise
    except aiormq.exceptions.ChannelNotFoundEntity as error:
        raise NotFound(f"RabbitMQ refused {what}: {describe(error)}") from None
    except REFUSALS as error:
        raise FailedPrecondition(f"RabbitMQ refused {what}: {describe(error)}") from None
    except TimeoutError:
        raise Unavailable(f"RabbitMQ did not confirm {what} within {seconds:g} s") from None
    except BROKER_ERRORS as error:
        raise Unavailable(f"RabbitMQ is unavailable ({what}): {describe(error)}") from None
    except ValueError as error:  # what pamqp raises for a name or value it does not take
        raise InvalidArgument(f"RabbitMQ's client cannot send {what}: {error}") from None
