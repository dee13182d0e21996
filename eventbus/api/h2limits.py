"""Limits on gRPC connections: how many, how many streams each, how idle, how chatty.

grpclib's server accepts any number of connections, keeps idle ones forever, answers every ping
and starts a handler task for every stream a client opens, even one it resets in the same
packet (HTTP/2 rapid reset, CVE-2023-44487). GuardedServer is grpclib's Server with a protocol
that enforces, per the [server] keys:

- max_connections: past it a new connection is closed at once (one rate-limited log line);
- max_streams_per_connection: sent as SETTINGS_MAX_CONCURRENT_STREAMS, enforced by h2;
- idle_timeout_seconds: a connection without an open stream that long gets GOAWAY and is closed;
- keepalive_min_ping_interval_seconds: a client pinging more often, more than PING_STRIKES times
  without the server sending anything between, gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings"
  (grpc-core's policy);
- max_client_resets per client_reset_window_seconds: a connection whose client resets more
  streams within RAPID_RESET_SECONDS of opening them gets GOAWAY ENHANCE_YOUR_CALM and is closed
  (a call reset later, at its deadline say, is ordinary); a stream opened and reset in one read
  never gets a handler task, and a large read is parsed in slices so a closed connection stops
  costing work at once;
- request messages are read by framing.FramedStream (size, truncation, request timeout).

It builds on grpclib internals beyond its documented API: Server._protocol_factory, the
H2Protocol attributes (handler, config, h2_config, connection, processor), the Connection and
EventsProcessor constructors, Connection._connection/_transport and protocol._set_nodelay.
check_grpclib() verifies them when the server is built, so an upgrade that moves them fails at
start, not under attack.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

import grpclib.protocol
import grpclib.server
from grpclib.config import Configuration
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoStatusDetailsCodec
from grpclib.protocol import Connection, EventsProcessor, H2Protocol, Stream
from grpclib.utils import Wrapper
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import Event, PingReceived, RequestReceived, StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings

from ..config import ServerConfig
from ..ops.ratelog import RateLimitedLog
from .framing import FramedStream, MessageLimits

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)

PING_STRIKES = 2  # pings too soon tolerated before GOAWAY, as grpc-core's max_ping_strikes
RAPID_RESET_SECONDS = 0.5  # a reset sooner than this after its stream opened counts
FEED_SLICE = 16 * 1024  # bytes handed to h2 at a time, so a closed connection stops costing
MAX_HEADER_LIST_BYTES = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """The per-server limits, from the [server] configuration keys."""

    max_connections: int
    max_streams: int
    idle_timeout: float
    ping_min_interval: float
    max_resets: int
    reset_window: float
    message: MessageLimits


def limits_of(server: ServerConfig) -> Limits:
    """The limits the [server] keys ask for."""
    return Limits(
        max_connections=server.max_connections,
        max_streams=server.max_streams_per_connection,
        idle_timeout=server.idle_timeout_seconds,
        ping_min_interval=server.keepalive_min_ping_interval_seconds,
        max_resets=server.max_client_resets,
        reset_window=server.client_reset_window_seconds,
        message=MessageLimits(server.max_message_bytes, server.request_timeout_seconds),
    )


def check_grpclib() -> None:
    """Fail at start, with the missing names, if grpclib no longer has what this module uses."""
    needed = {
        grpclib.server.Server: ("_protocol_factory",),
        grpclib.protocol.H2Protocol: ("connection_made", "data_received", "connection_lost"),
        grpclib.protocol.EventsProcessor: ("register", "process", "close"),
        grpclib.protocol.Connection: ("flush", "feed", "headers_send_process"),
        grpclib.protocol.Buffer: ("read",),
        grpclib.protocol: ("_set_nodelay",),
    }
    missing = [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for owner, names in needed.items()
        for name in names
        if not hasattr(owner, name)
    ]
    if missing:
        raise RuntimeError(f"grpclib {grpclib.__version__} lacks {', '.join(missing)}")


class Guard:
    """What every connection of one server shares: the limits and the count of connections."""

    def __init__(self, limits: Limits, unary_paths: Collection[str]) -> None:
        self.limits = limits
        self.unary_paths = frozenset(unary_paths)
        self.connections = 0

    def admit(self, peer: Any) -> bool:
        """Count a new connection in, or say it must be refused (logged, rate-limited)."""
        if self.connections >= self.limits.max_connections:
            ratelog.warning(
                "refused",
                "gRPC: refused a connection from %s: %d open (server.max_connections)",
                _show_peer(peer),
                self.connections,
            )
            return False
        self.connections += 1
        return True


class GuardedServer(grpclib.server.Server):
    """grpclib's Server whose connections keep to Limits."""

    def __init__(
        self,
        handlers: Collection[Any],
        *,
        codec: CodecBase,
        limits: Limits,
        config: Configuration | None = None,
    ) -> None:
        check_grpclib()
        # With a codec of its own grpclib sets no status details codec: without this one it
        # would drop the details of an error (a quota's RetryInfo).
        super().__init__(
            handlers,
            codec=codec,
            status_details_codec=ProtoStatusDetailsCodec(),
            config=config,
        )
        unary = [
            path
            for handler in handlers
            for path, method in handler.__mapping__().items()
            if not method.cardinality.client_streaming
        ]
        self.guard = Guard(limits, unary)

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return GuardedProtocol(plain.handler, plain.config, plain.h2_config, self.guard)


class GuardedConnection(Connection):
    """grpclib's Connection, creating framed streams and counting the client's pings."""

    def __init__(
        self,
        h2: H2Connection,
        transport: asyncio.Transport,
        *,
        config: Configuration,
        message_limits: MessageLimits,
    ) -> None:
        super().__init__(h2, transport, config=config)
        self.message_limits = message_limits
        self.ping_strikes = 0
        self.last_ping = -float("inf")

    def create_stream(
        self, *, stream_id: int | None = None, wrapper: Wrapper | None = None
    ) -> Stream:
        stream = FramedStream(self, self._connection, self._transport, wrapper=wrapper)
        stream.limits = self.message_limits
        if stream_id is not None:
            stream.init_stream(stream_id, self)
        return stream

    def headers_send_process(self) -> None:
        super().headers_send_process()
        self.ping_strikes = 0

    def data_send_process(self) -> None:
        super().data_send_process()
        self.ping_strikes = 0

    def ping_too_soon(self, min_interval: float) -> bool:
        """Count a ping from the client; true once it struck more than PING_STRIKES times."""
        now = time.monotonic()
        if now - self.last_ping < min_interval:
            self.ping_strikes += 1
        self.last_ping = now
        return self.ping_strikes > PING_STRIKES


class GuardedProcessor(EventsProcessor):
    """grpclib's event processor, telling each stream whether it must carry a message and
    the protocol when a stream is done."""

    def __init__(self, *args: Any, unary_paths: frozenset[str], on_release: Callable[[], None]):
        super().__init__(*args)
        self._unary_paths = unary_paths
        self._on_release = on_release

    def register(self, stream: Stream) -> Callable[[], None]:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            self._on_release()

        return release_stream

    def process_request_received(self, event: RequestReceived) -> None:
        stream = self.connection.create_stream(stream_id=event.stream_id)
        headers = cast(list[tuple[str, str]], event.headers)
        cast(FramedStream, stream).needs_message = dict(headers).get(":path") in self._unary_paths
        release_stream = self.register(stream)
        self.handler.accept(stream, headers, release_stream)


class GuardedProtocol(H2Protocol):
    """One client connection under the server's Limits."""

    _refused = False
    _closing = False
    _idle_timer: asyncio.TimerHandle | None = None

    def __init__(self, handler: Any, config: Configuration, h2_config: Any, guard: Guard):
        super().__init__(handler, config, h2_config)
        self.guard = guard
        self.limits = guard.limits
        self._peer: Any = None
        self._busy_at = time.monotonic()
        self._resets = 0
        self._resets_since = time.monotonic()
        self._opened: OrderedDict[int, float] = OrderedDict()  # stream id -> opened, recent only

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = transport.get_extra_info("peername")
        if not self.guard.admit(self._peer):
            self._refused = True
            self.handler.close()
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            grpclib.protocol._set_nodelay(sock)
        h2 = self._h2_connection()
        self.connection = GuardedConnection(
            h2,
            cast(asyncio.Transport, transport),
            config=self.config,
            message_limits=self.limits.message,
        )
        self.connection.flush()
        self.connection.initialize()
        self.processor = GuardedProcessor(
            self.handler,
            self.connection,
            unary_paths=self.guard.unary_paths,
            on_release=self._mark_busy,
        )
        self._schedule_idle_check(self.limits.idle_timeout)

    def _h2_connection(self) -> H2Connection:
        """The h2 state machine with our SETTINGS in force from the first frame."""
        h2 = H2Connection(config=self.h2_config)
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_BYTES,
            },
        )
        h2.decoder.max_header_list_size = MAX_HEADER_LIST_BYTES  # h2 applies it only on ACK
        h2.initiate_connection()
        initial = h2.local_settings.initial_window_size
        if self.config.http2_connection_window_size != initial:
            h2.increment_flow_control_window(self.config.http2_connection_window_size - initial)
        if self.config.http2_stream_window_size != initial:
            h2.update_settings(
                {SettingCodes.INITIAL_WINDOW_SIZE: self.config.http2_stream_window_size}
            )
        return h2

    def data_received(self, data: bytes) -> None:
        """Feed the client's bytes to h2 a slice at a time and act on the events."""
        for start in range(0, len(data), FEED_SLICE):
            if self._closing or self.connection.is_closing():
                return
            try:
                events = self.connection.feed(data[start : start + FEED_SLICE])
            except ProtocolError as error:
                self.connection.flush()  # the GOAWAY h2 prepared, saying why
                self._drop("protocol error", repr(error))
                return
            except Exception as error:  # h2 choking on what the client sent
                self._drop("unparsable frames", repr(error))
                return
            self.connection.flush()
            self._process(events)
            if not self._closing:
                self.connection.flush()

    def _process(self, events: list[Event]) -> None:
        """Hand events to grpclib, except streams reset in the same batch they were opened in,
        which never get a handler; count resets and pings against the limits."""
        reset_now = {e.stream_id for e in events if isinstance(e, StreamReset) and e.remote_reset}
        known = getattr(self.processor, "processors", {})  # gone once grpclib closed it
        for event in events:
            if isinstance(event, RequestReceived):
                self._busy_at = time.monotonic()
                self._note_opened(event.stream_id, self._busy_at)
                if event.stream_id in reset_now:
                    continue
            elif self._over_limit(event):
                return
            if type(event) in known:  # unknown extension frames are ignored, as RFC 9113 says
                self.processor.process(event)
            if self._closing:
                return

    def _note_opened(self, stream_id: int, now: float) -> None:
        """Remember when a stream opened, for as long as a reset of it would count as rapid."""
        self._opened[stream_id] = now
        while self._opened and next(iter(self._opened.values())) < now - RAPID_RESET_SECONDS:
            self._opened.popitem(last=False)

    def _rapid(self, event: StreamReset) -> bool:
        """Whether the client reset this stream soon after opening it, as in a rapid-reset
        flood; a call it gives up on at its deadline is ordinary."""
        opened = self._opened.pop(event.stream_id, None)
        return opened is not None and time.monotonic() - opened < RAPID_RESET_SECONDS

    def _over_limit(self, event: Event) -> bool:
        """Whether this reset or ping broke a limit (the connection is then being closed)."""
        if isinstance(event, StreamReset) and event.remote_reset:
            return self._rapid(event) and self._reset_over()
        if isinstance(event, PingReceived):
            return self._pinged_too_often()
        return False

    def _reset_over(self) -> bool:
        now = time.monotonic()
        if now - self._resets_since > self.limits.reset_window:
            self._resets, self._resets_since = 0, now
        self._resets += 1
        if self._resets <= self.limits.max_resets:
            return False
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_resets")
        self._drop(
            "resets",
            f"{self._resets} streams reset by the client within "
            f"{self.limits.reset_window:g} s (server.max_client_resets)",
        )
        return True

    def _pinged_too_often(self) -> bool:
        connection = cast(GuardedConnection, self.connection)
        if not connection.ping_too_soon(self.limits.ping_min_interval):
            return False
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings")
        self._drop(
            "pings",
            f"pings more often than every {self.limits.ping_min_interval:g} s "
            "(server.keepalive_min_ping_interval_seconds)",
        )
        return True

    def _mark_busy(self) -> None:
        self._busy_at = time.monotonic()

    def _schedule_idle_check(self, delay: float) -> None:
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """Close the connection once it had no open stream for idle_timeout; else look again."""
        if self._closing:
            return
        if self.processor.streams:
            self._busy_at = time.monotonic()
        idle_for = time.monotonic() - self._busy_at
        if idle_for < self.limits.idle_timeout:
            self._schedule_idle_check(self.limits.idle_timeout - idle_for)
            return
        self._goaway(ErrorCodes.NO_ERROR, b"idle")
        logger.debug("gRPC: closing %s: idle for %.1f s", _show_peer(self._peer), idle_for)
        self._close("idle connection closed")

    def _goaway(self, code: ErrorCodes, reason: bytes) -> None:
        h2 = self.connection._connection
        try:
            h2.close_connection(error_code=code, additional_data=reason)
        except ProtocolError:
            return  # the connection is already closed on the h2 side
        self.connection.flush()

    def _drop(self, kind: str, why: str) -> None:
        ratelog.warning(
            kind, "gRPC: closing the connection from %s: %s", _show_peer(self._peer), why
        )
        self._close(why)

    def _close(self, reason: str) -> None:
        self._closing = True
        self.processor.close(reason)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self.guard.connections -= 1
        self._closing = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        super().connection_lost(exc)


def _show_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
