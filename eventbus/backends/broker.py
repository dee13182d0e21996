"""RabbitMQ: two supervised AMQP connections, one that publishes and one that never does,
re-established together when either is lost.

aio-pika's robust connection does not always restore consumers and can leave a publish waiting
forever on a dead connection, so the daemon uses plain connections and supervises them here: a
loss is noticed through a connection's close callback, and reconnecting is retried for at most
amqp.reconnect_window_seconds; past that the daemon exits non-zero and systemd restarts it.

With several brokers (amqp.urls: nodes of one cluster), each connect attempt tries them in turn,
as listed or shuffled anew (amqp.url_order), and takes the first that answers; after a loss the
broker lost is tried last, so the daemon moves on to the next one. A move is a reconnect like any
other (a new generation: channels, consumers and declarations start again on the new broker),
and is counted in eventbus_broker_failovers.

During a memory or disk alarm RabbitMQ blocks the connection that publishes (and only tells it
so when it publishes): Broker.blocked then says why, and publishing fails at once instead of
writing messages RabbitMQ will not read until the alarm ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq.exceptions
import trio

from ..config import AmqpConfig
from ..errors import DependencyUnavailable, ResourceExhausted, Unavailable
from ..ops.metrics import Metrics
from . import aio
from .retry import ATTEMPT_TIMEOUT, FIRST_DELAY, MAX_DELAY, describe, redact

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CALL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
CHANNEL_CEILING = 2000  # per connection, below RabbitMQ's default channel_max of 2047
ALARM_CHECK_SECONDS = 1.0
PUBLISH, CONSUME = "publish", "consume"  # the two connections' roles, named in RabbitMQ too
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
ALARM_CHECK_ERRORS: tuple[type[BaseException], ...] = (*CHANNEL_OPEN_ERRORS, Unavailable)
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
RETRYABLE: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, trio.TooSlowError)


def broker_order(
    urls: Sequence[str],
    order: str,
    *,
    after: str | None = None,
    shuffle: Callable[[list[str]], None] = random.shuffle,
) -> list[str]:
    """The brokers to try in one connect attempt: as listed, or shuffled (url_order
    "shuffled"); after losing the broker `after`, those following it come first and it comes
    last, so the daemon moves on rather than back to the broker it lost."""
    listed = list(urls)
    if order == "shuffled":
        shuffle(listed)
    if after in listed:
        lost = listed.index(after)
        listed = listed[lost + 1 :] + listed[: lost + 1]
    return listed


class BrokerUnavailable(Unavailable):
    """RabbitMQ is not connected right now."""


class Blocked(Unavailable):
    """RabbitMQ blocks publishers (a memory or disk alarm): a publish now would not be stored."""


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
    """The daemon's two AMQP connections, whether they are up, and whether RabbitMQ blocks
    publishers.

    RabbitMQ blocks a connection that publishes during a memory or disk alarm: it stops reading
    from it altogether. So one connection publishes (the confirm channels and probes) and the
    other never does (consumers, acks, declarations, passive declares), and keeps working during
    an alarm. Both belong to one generation: losing either closes both and opens a new pair.
    """

    def __init__(self, config: AmqpConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.url = config.brokers[0]  # the broker connected to, or last tried
        self.server_version: str | None = None  # RabbitMQ's, as the broker connected to says
        self._metrics = metrics
        self._connections: dict[str, aio_pika.abc.AbstractConnection] = {}
        self._up = False
        self._up_event = trio.Event()
        self.generation = 0  # counts connection pairs; channels of an older one are dead
        self._lost_send, self._lost_receive = trio.open_memory_channel[tuple[int, str]](1)
        self.blocked: str | None = None  # why RabbitMQ blocks publishers, None while it does not
        self._blocked_since = 0.0
        self._block_changed = asyncio.Event()  # set and cleared at once: wakes waiters (asyncio)

    @property
    def address(self) -> str:
        """The broker connected to (or last tried), its password hidden: for logs and errors."""
        return redact(self.url)

    @property
    def connected(self) -> bool:
        """Both connections are up."""
        return self._up

    @property
    def connection(self) -> aio_pika.abc.AbstractConnection:
        """The live connection that never publishes (consumers, acks, declarations); raises
        BrokerUnavailable while there is none."""
        return self._live(CONSUME)

    @property
    def publishing(self) -> aio_pika.abc.AbstractConnection:
        """The live connection that publishes; raises BrokerUnavailable while there is none."""
        return self._live(PUBLISH)

    def _live(self, role: str) -> aio_pika.abc.AbstractConnection:
        connection = self._connections.get(role)
        if connection is None or not self._up:
            raise BrokerUnavailable(f"RabbitMQ at {self.address} is not connected")
        return connection

    def connection_states(self) -> dict[str, str]:
        """{role: "open" | "closed"} for /stats."""
        states = {}
        for role in (PUBLISH, CONSUME):
            connection = self._connections.get(role)
            states[role] = "closed" if connection is None or connection.is_closed else "open"
        return states

    async def ping(self) -> str | None:
        """Raise BrokerUnavailable unless both connections are up; while RabbitMQ blocks
        publishers, return why (a readiness check's "degraded")."""
        self.connection  # noqa: B018 (the property raises when down)
        return f"blocked: {self.blocked}" if self.blocked else None

    def refuse_while_blocked(self) -> None:
        """Raise Blocked while RabbitMQ blocks publishers, so nothing is written in vain."""
        if self.blocked:
            raise Blocked(
                f"RabbitMQ is blocking publishers ({self.blocked}); the message was not stored, "
                "try again"
            )

    async def until_blocked(self) -> None:
        """(asyncio side) Wait until RabbitMQ blocks publishers."""
        while not self.blocked:
            await self._block_changed.wait()

    async def connect(self, window: float) -> None:
        """Open a new pair of connections to the first broker that answers, trying them in
        turn (broker_order) within window seconds; DependencyUnavailable past it. After a loss
        the broker lost is tried last; connecting to another than before is a failover."""
        before = self.url if self.generation else None
        url, pair = await self._connect_any(window, after=before)
        self.url = url
        self.server_version = server_version(pair[CONSUME])
        self.generation += 1
        self._end_block("blocking ended with the connection")
        for connection in pair.values():
            connection.close_callbacks.add(partial(self._on_close, self.generation))
        generation = self.generation
        watch_blocking(
            pair[PUBLISH],
            lambda reason: self._on_blocked(reason) if generation == self.generation else None,
            lambda: self._on_unblocked() if generation == self.generation else None,
        )
        self._connections = pair
        self._up = True
        self._up_event.set()
        if before is not None and url != before and self._metrics is not None:
            self._metrics.broker_failovers.inc()

    async def _connect_any(
        self, window: float, *, after: str | None
    ) -> tuple[str, dict[str, aio_pika.abc.AbstractConnection]]:
        """Try the brokers in turn, round after round with a growing pause between rounds,
        one warning line per failed attempt, until one answers or window seconds have passed."""
        give_up_at = trio.current_time() + window
        delay, attempt = FIRST_DELAY, 0
        while True:
            urls = broker_order(self.config.brokers, self.config.url_order, after=after)
            for n, url in enumerate(urls, 1):
                attempt += 1
                self.url = url
                left = give_up_at - trio.current_time()
                try:
                    with trio.fail_after(max(0.1, min(ATTEMPT_TIMEOUT, left))):
                        return url, await self._open_pair(url)
                except RETRYABLE as error:
                    reason = describe(error)
                left = give_up_at - trio.current_time()
                if left <= 0:
                    raise DependencyUnavailable(
                        f"RabbitMQ at {self._all_addresses()} did not answer within "
                        f"{window:g} s: {reason}"
                    )
                then = "trying the next broker" if n < len(urls) else f"retrying in {delay:.1f} s"
                logger.warning(
                    "RabbitMQ at %s: %s (attempt %d); %s", self.address, reason, attempt, then
                )
            await trio.sleep(max(0.0, min(delay, give_up_at - trio.current_time())))
            delay = min(delay * 2, MAX_DELAY)

    def _all_addresses(self) -> str:
        return ", ".join(redact(url) for url in self.config.brokers)

    async def _open_pair(self, url: str) -> dict[str, aio_pika.abc.AbstractConnection]:
        pair: dict[str, aio_pika.abc.AbstractConnection] = {}
        try:
            for role in (CONSUME, PUBLISH):
                pair[role] = await self._open(url, role)
        except BaseException:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await aio.call(_close_all, list(pair.values()))
            raise
        return pair

    async def _open(self, url: str, role: str) -> aio_pika.abc.AbstractConnection:
        connect: Any = aio_pika.connect  # overloaded; the seam takes any coroutine function
        return await aio.call(
            connect,
            url,
            timeout=CONNECT_TIMEOUT,
            heartbeat=self.config.heartbeat_seconds,
            client_properties={"connection_name": f"eventbus {role}"},
        )

    def _on_close(self, generation: int, _sender: Any, error: BaseException | None) -> None:
        # Runs on the asyncio side; one pending notice is enough, so a full channel drops this one.
        if generation != self.generation:
            return
        self._mark_down()
        with contextlib.suppress(trio.WouldBlock):
            self._lost_send.send_nowait((generation, describe(error) if error else "closed"))

    def _on_blocked(self, reason: str) -> None:
        if self.blocked is None:
            self._blocked_since = time.monotonic()
            logger.warning(
                "RabbitMQ: blocking publishers (%s); publishes fail at once until it ends", reason
            )
            if self._metrics is not None:
                self._metrics.broker_blocks.inc()
        self.blocked = reason or "blocked"
        self._set_blocked_gauge(1)
        self._wake_block_waiters()

    def _on_unblocked(self) -> None:
        self._end_block("no longer blocking publishers")

    def _end_block(self, how: str) -> None:
        if self.blocked is None:
            return
        logger.info(
            "RabbitMQ: %s after %.1f s (%s)",
            how,
            time.monotonic() - self._blocked_since,
            self.blocked,
        )
        self.blocked = None
        self._set_blocked_gauge(0)
        self._wake_block_waiters()

    def _set_blocked_gauge(self, value: int) -> None:
        if self._metrics is not None:
            self._metrics.broker_blocked.set(value)

    def _wake_block_waiters(self) -> None:
        self._block_changed.set()
        self._block_changed.clear()

    def _mark_down(self) -> None:
        if self._up:
            self._up = False
            self._up_event = trio.Event()

    async def wait_connected(self) -> aio_pika.abc.AbstractConnection:
        """Wait until both connections are up, and return the one that never publishes."""
        while not self._up:
            await self._up_event.wait()
        return self.connection

    async def channel(self, *, confirms: bool = False, prefetch: int = 0) -> Channel:
        """A new channel on the connection that never publishes (BrokerUnavailable while there
        is none, ResourceExhausted when the connection is near RabbitMQ's channel_max)."""
        connection, generation = self.connection, self.generation
        check_channel_count(connection)
        try:
            with trio.fail_after(CALL_TIMEOUT):
                channel = await aio.call(connection.channel, publisher_confirms=confirms)
                if prefetch:
                    await aio.call(channel.set_qos, prefetch_count=prefetch)
        except CHANNEL_OPEN_ERRORS as error:
            raise BrokerUnavailable(f"RabbitMQ at {self.address}: {describe(error)}") from None
        return Channel(channel, generation)

    async def wait_lost(self) -> str:
        """Wait until a connection of the current pair is lost; returns why."""
        while True:
            generation, reason = await self._lost_receive.receive()
            if generation == self.generation:
                return reason

    async def check_alarms(self) -> None:
        """Publish a message that reaches no queue every ALARM_CHECK_SECONDS while not blocked.

        RabbitMQ tells a connection that it is blocked only when the connection publishes
        during an alarm; this keeps Broker.blocked true to the alarms also while no client
        publishes, so the first publish during an alarm already fails fast.
        """
        channel: Channel | None = None
        while True:
            await trio.sleep(ALARM_CHECK_SECONDS)
            if not self._up or self.blocked:
                continue
            try:
                if (
                    channel is None
                    or channel.generation != self.generation
                    or channel.amqp.is_closed
                ):
                    channel = await self._alarm_check_channel()
                with trio.fail_after(CALL_TIMEOUT):
                    await aio.call(_publish_nowhere, channel.amqp)
            except ALARM_CHECK_ERRORS as error:
                logger.debug("RabbitMQ: alarm check skipped: %s", describe(error))

    async def _alarm_check_channel(self) -> Channel:
        connection, generation = self.publishing, self.generation
        with trio.fail_after(CALL_TIMEOUT):
            channel = await aio.call(connection.channel, publisher_confirms=False)
        return Channel(channel, generation)

    async def close(self) -> None:
        """Close both connections, waiting at most CLOSE_TIMEOUT seconds."""
        connections, self._connections = list(self._connections.values()), {}
        self._mark_down()
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aio.call(_close_all, connections)


async def _close_all(connections: list[aio_pika.abc.AbstractConnection]) -> None:
    """(asyncio side) Close connections; one already gone is only a debug line."""
    for connection in connections:
        try:
            await connection.close()
        except BROKER_ERRORS as error:
            logger.debug("closing a connection failed: %s", describe(error))


async def _publish_nowhere(channel: aio_pika.abc.AbstractChannel) -> None:
    """(asyncio side) Publish an empty message no queue receives (the default exchange, the
    empty routing key), without waiting for anything: RabbitMQ drops it."""
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(b"", exchange="", routing_key="")


def server_version(connection: aio_pika.abc.AbstractConnection) -> str | None:
    """The RabbitMQ version a connection's broker gave when it opened (server_properties
    "version", "3.10.8" say); None when it gave none."""
    transport = getattr(connection, "transport", None)
    properties = getattr(getattr(transport, "connection", None), "server_properties", None)
    version = properties.get("version") if isinstance(properties, dict) else None
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    return str(version) if version else None


def check_channel_count(connection: aio_pika.abc.AbstractConnection) -> None:
    """Refuse a channel past CHANNEL_CEILING: RabbitMQ closes the whole connection when a
    client opens more than its channel_max."""
    transport = getattr(connection, "transport", None)
    channels = getattr(getattr(transport, "connection", None), "channels", None)
    if channels is not None and len(channels) >= CHANNEL_CEILING:
        raise ResourceExhausted(
            f"the connection to RabbitMQ has {len(channels)} channels open, the most this "
            "node uses; try again when other queues are idle"
        )


def watch_blocking(
    connection: aio_pika.abc.AbstractConnection,
    on_blocked: Callable[[str], None],
    on_unblocked: Callable[[], None],
) -> None:
    """Call on_blocked(reason) and on_unblocked() when RabbitMQ sends connection.blocked and
    connection.unblocked on this connection.

    aiormq handles those two frames in two private methods that only log, and has no public
    hook for them. This wraps the two methods on this one connection object (the reader looks
    them up on the instance), keeping what they do. An aiormq without them is told in one
    warning line, and then the daemon cannot tell when RabbitMQ blocks it.
    """
    underlay: Any = getattr(connection, "transport", None)
    underlay = getattr(underlay, "connection", None)
    names = ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked")
    if underlay is None or not all(hasattr(underlay, name) for name in names):
        logger.warning("RabbitMQ: this aiormq does not say when RabbitMQ blocks publishers")
        return
    handle_blocked, handle_unblocked = (getattr(underlay, name) for name in names)

    async def blocked(frame: Any) -> None:
        on_blocked(str(frame.reason or ""))
        await handle_blocked(frame)

    async def unblocked(frame: Any) -> None:
        on_unblocked()
        await handle_unblocked(frame)

    setattr(underlay, names[0], blocked)
    setattr(underlay, names[1], unblocked)


async def run(
    config: AmqpConfig,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[Broker] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect, serve the Broker to the daemon, and reconnect whenever a connection is lost
    (both are closed and opened anew); meanwhile check for alarms.

    Raises DependencyUnavailable when RabbitMQ stays away longer than the reconnect window.
    """
    broker = Broker(config, metrics)
    await broker.connect(config.reconnect_window_seconds)
    logger.info("RabbitMQ: connected to %s", broker.address)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(broker.check_alarms)
            task_status.started(broker)
            await _reconnect_forever(broker, config, metrics)
    finally:
        await broker.close()


async def _reconnect_forever(broker: Broker, config: AmqpConfig, metrics: Metrics) -> None:
    while True:
        reason = await broker.wait_lost()
        lost = broker.address
        logger.warning(
            "RabbitMQ: connection to %s lost (%s); reconnecting for up to %g s",
            lost,
            reason,
            config.reconnect_window_seconds,
        )
        await broker.close()
        await broker.connect(config.reconnect_window_seconds)
        metrics.reconnects.labels("rabbitmq").inc()
        if broker.address == lost:
            logger.info("RabbitMQ: reconnected to %s", broker.address)
        else:
            logger.info("RabbitMQ: reconnected to %s (failover from %s)", broker.address, lost)
