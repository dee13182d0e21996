"""The client's one grpclib Channel and the stubs over it, made on first use (inside the running
event loop, which grpclib binds the channel to)."""

from __future__ import annotations

import ssl as _ssl
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.events import SendRequest, listen

from .._generated import mq_grpc, v2_grpc


def parse_target(target: str) -> tuple[str | None, int | None, str | None]:
    """host, port and socket path of "host:port", "[v6 address]:port" or "unix:PATH"."""
    if target.startswith("unix:"):
        path = target.removeprefix("unix:")
        return None, None, ("/" + path.lstrip("/")) if path.startswith("//") else path
    host, colon, port = target.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r}: expected host:port or unix:PATH")
    return host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port), None


def keepalive(seconds: float | None) -> Configuration:
    """Ping the server every `seconds` while a call is open (a subscriber's stream may be quiet
    for long), and drop the connection when a ping goes unanswered for 20 s; None: no pings.
    Keep it above the daemon's server.keepalive_min_ping_interval_seconds."""
    if seconds is None:
        return Configuration()
    return Configuration(
        _keepalive_time=seconds,
        _keepalive_timeout=20.0,
        _http2_max_pings_without_data=0,
        _http2_min_sent_ping_interval_without_data=seconds,
    )


@dataclass(frozen=True)
class Stubs:
    channel: Channel
    publisher: v2_grpc.PublisherStub
    subscriber: v2_grpc.SubscriberStub
    mq: mq_grpc.MqStub
    mq_topic: mq_grpc.MqTopicStub
    admin: v2_grpc.AdminStub

    @classmethod
    def over(cls, channel: Channel) -> Stubs:
        return cls(
            channel,
            v2_grpc.PublisherStub(channel),
            v2_grpc.SubscriberStub(channel),
            mq_grpc.MqStub(channel),
            mq_grpc.MqTopicStub(channel),
            v2_grpc.AdminStub(channel),
        )


class Connection:
    """Where the daemon is, and the channel to it once one was needed."""

    def __init__(
        self,
        target: str,
        ssl: _ssl.SSLContext | bool | None,
        keepalive_seconds: float | None,
        token: str | None = None,
    ) -> None:
        self.host, self.port, self.path = parse_target(target)
        self._ssl = ssl
        self._config = keepalive(keepalive_seconds)
        self._token = token
        self._stubs: Stubs | None = None

    @property
    def stubs(self) -> Stubs:
        if self._stubs is None:
            self._stubs = Stubs.over(self._open())
        return self._stubs

    def _open(self) -> Channel:
        if self.path is not None:
            channel = Channel(path=self.path, ssl=self._ssl, config=self._config)
        else:
            channel = Channel(self.host, self.port, ssl=self._ssl, config=self._config)
        if self._token:
            listen(channel, SendRequest, self._authorize)
        return channel

    async def _authorize(self, event: SendRequest) -> None:
        """Every call carries the bearer token (auth.mode token or any)."""
        event.metadata["authorization"] = f"Bearer {self._token}"

    def close(self) -> None:
        """Close the channel; calls still open fail. The next call opens a new one."""
        if self._stubs is not None:
            self._stubs.channel.close()
            self._stubs = None
