"""RabbitMQ: one supervised AMQP connection, re-established when lost.

aio-pika's robust connection does not always restore consumers and can leave a publish waiting
forever on a dead connection, so the daemon uses a plain connection and supervises it here: a
loss is noticed through the connection's close callback, and reconnecting is retried for at most
amqp.reconnect_window_seconds; past that the daemon exits non-zero and systemd restarts it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import trio

from . import aio
from .config import AmqpConfig
from .errors import ResourceExhausted, Unavailable
from .metrics import Metrics
from .retry import connect_within, describe, redact

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
CHANNEL_CEILING = 2000  # below RabbitMQ's default channel_max of 2047
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel closed meanwhile
    aio_pika.exceptions.AMQPException,
    ConnectionError,
    OSError,
)
CHANNEL_ERRORS: tuple[type[BaseException], ...] = (*BROKER_ERRORS, trio.TooSlowError)
# aiormq raises a bare RuntimeError ("<Connection> closed") for a channel asked of a connection
# that closed before its close callback ran.
CHANNEL_OPEN_ERRORS: tuple[type[BaseException], ...] = (*CHANNEL_ERRORS, RuntimeError)
# RabbitMQ refusing what the bus asked of an entity: another try will not change its mind.
REFUSALS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ChannelAccessRefused,
    aiormq.exceptions.ChannelLockedResource,
)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.IncompatibleProtocolError,
)


class BrokerUnavailable(Unavailable):
    """RabbitMQ is not connected right now."""


@dataclass(frozen=True)
class Channel:
    """An AMQP channel and the connection generation it belongs to."""

    amqp: aio_pika.abc.AbstractChannel
    generation: int

    async def close(self) -> None:
        """Close the channel if it is open, within CLOSE_TIMEOUT, also from a cancelled scope;
        a failure (its connection is gone already) is only a debug line."""
        if self.amqp.is_closed:
            return
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            try:
                await aio.call(self.amqp.close)
            except BROKER_ERRORS as error:
                logger.debug("closing a channel failed: %s", describe(error))


class Broker:
    """The daemon's AMQP connection, and whether it is up."""

    def __init__(self, config: AmqpConfig) -> None:
        self.config = config
        self.address = redact(config.url)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._up = False
        self._up_event = trio.Event()
        self.generation = 0  # counts connections; channels of an older one are dead
        self._lost_send, self._lost_receive = trio.open_memory_channel[str](1)

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def connection(self) -> aio_pika.abc.AbstractConnection:
        """The live connection; raises BrokerUnavailable while there is none."""
        if self._connection is None or not self._up:
            raise BrokerUnavailable(f"RabbitMQ at {self.address} is not connected")
        return self._connection

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the connection is up."""
        self.connection  # noqa: B018 (the property raises when down)

    async def connect(self, window: float) -> None:
        """Open a new connection within window seconds (DependencyUnavailable past it)."""
        connection = await connect_within(
            "RabbitMQ", self.address, self._open, window, TRANSIENT_ERRORS
        )
        connection.close_callbacks.add(self._on_close)
        self._connection = connection
        self._up = True
        self.generation += 1
        self._up_event.set()

    async def _open(self) -> aio_pika.abc.AbstractConnection:
        connect: Any = aio_pika.connect  # overloaded; the seam takes any coroutine function
        return await aio.call(
            connect,
            self.config.url,
            timeout=CONNECT_TIMEOUT,
            heartbeat=self.config.heartbeat_seconds,
            client_properties={"connection_name": "eventbus"},
        )

    def _on_close(self, _sender: Any, error: BaseException | None) -> None:
        # Runs on the asyncio side; one pending notice is enough, so a full channel drops this one.
        self._mark_down()
        with contextlib.suppress(trio.WouldBlock):
            self._lost_send.send_nowait(describe(error) if error else "closed")

    def _mark_down(self) -> None:
        if self._up:
            self._up = False
            self._up_event = trio.Event()

    async def wait_connected(self) -> aio_pika.abc.AbstractConnection:
        """Wait until the connection is up, and return it."""
        while not self._up:
            await self._up_event.wait()
        return self.connection

    async def channel(self, *, confirms: bool = False, prefetch: int = 0) -> Channel:
        """A new channel on the live connection (BrokerUnavailable while there is none,
        ResourceExhausted when the connection is near RabbitMQ's channel_max)."""
        connection, generation = self.connection, self.generation
        self._check_channel_count(connection)
        try:
            with trio.fail_after(CALL_TIMEOUT):
                channel = await aio.call(connection.channel, publisher_confirms=confirms)
                if prefetch:
                    await aio.call(channel.set_qos, prefetch_count=prefetch)
        except CHANNEL_OPEN_ERRORS as error:
            raise BrokerUnavailable(f"RabbitMQ at {self.address}: {describe(error)}") from None
        return Channel(channel, generation)

    def _check_channel_count(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Refuse a channel past CHANNEL_CEILING: RabbitMQ closes the whole connection when a
        client opens more than its channel_max."""
        transport = getattr(connection, "transport", None)
        channels = getattr(getattr(transport, "connection", None), "channels", None)
        if channels is not None and len(channels) >= CHANNEL_CEILING:
            raise ResourceExhausted(
                f"the connection to RabbitMQ has {len(channels)} channels open, the most this "
                "node uses; try again when other queues are idle"
            )

    async def wait_lost(self) -> str:
        """Wait until the connection is lost; returns why."""
        return await self._lost_receive.receive()

    async def close(self) -> None:
        """Close the connection, waiting at most CLOSE_TIMEOUT seconds."""
        connection, self._connection = self._connection, None
        self._mark_down()
        if connection is None:
            return
        connection.close_callbacks.discard(self._on_close)
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aio.call(connection.close)


async def run(
    config: AmqpConfig,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect, serve the Broker to the daemon, and reconnect whenever the connection is lost.

    Raises DependencyUnavailable when RabbitMQ stays away longer than the reconnect window.
    """
    broker = Broker(config)
    await broker.connect(config.reconnect_window_seconds)
    logger.info("RabbitMQ: connected to %s", broker.address)
    try:
        task_status.started(broker)
        while True:
            reason = await broker.wait_lost()
            logger.warning(
                "RabbitMQ: connection lost (%s); reconnecting for up to %g s",
                reason,
                config.reconnect_window_seconds,
            )
            await broker.connect(config.reconnect_window_seconds)
            metrics.reconnects.labels("rabbitmq").inc()
            logger.info("RabbitMQ: reconnected to %s", broker.address)
    finally:
        await broker.close()
