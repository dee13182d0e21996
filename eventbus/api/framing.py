"""Reading a call's request messages: the gRPC length prefix checked before the body is read.

grpclib trusts the 5-byte prefix (flag, length) and reads the whole body before any size check;
a truncated body trips an assertion, a compressed flag a NotImplementedError, both answered as
INTERNAL with a traceback in the log. FramedStream reads the same bytes with the checks up
front, so every malformed request gets a status that says what was wrong:

- a length over server.max_message_bytes: RESOURCE_EXHAUSTED at once, the body never read;
- a stream that ends inside a prefix or a body, or a unary call without its message:
  INVALID_ARGUMENT;
- a compressed message (no grpc-encoding is accepted): UNIMPLEMENTED; a flag byte other than
  0 or 1: INVALID_ARGUMENT;
- a first message (or any body once its prefix came) that takes longer than
  server.request_timeout_seconds: DEADLINE_EXCEEDED.

It subclasses grpclib's protocol.Stream and relies on grpclib reading a message as
``recv_data(5)`` then ``recv_data(length)`` (grpclib.stream.recv_message), on its ``buffer``
attribute and on Buffer.read raising AssertionError when the stream ends short of the size;
h2limits checks those names when the server is built.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Connection, Stream

from ..ops.ratelog import RateLimitedLog

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)


@dataclass(frozen=True)
class MessageLimits:
    """What a request message may be: its size, and how long it may take to arrive."""

    max_bytes: int
    timeout: float


def check_prefix(prefix: bytes, max_bytes: int) -> int:
    """The body length a 5-byte gRPC prefix announces; a GRPCError if it is not acceptable."""
    flag, length = struct.unpack(">BI", prefix)
    if flag == 1:
        raise GRPCError(
            Status.UNIMPLEMENTED,
            "compressed messages are not accepted (send grpc-encoding identity)",
        )
    if flag != 0:
        raise GRPCError(Status.INVALID_ARGUMENT, f"malformed message prefix: flag byte {flag}")
    if length > max_bytes:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"request of {length} bytes is over the limit of {max_bytes} bytes "
            "(server.max_message_bytes)",
        )
    return int(length)


class FramedStream(Stream):
    """A server-side HTTP/2 stream whose reads follow gRPC's framing and enforce its limits."""

    limits = MessageLimits(max_bytes=4 * 1024 * 1024, timeout=30.0)
    needs_message = False  # a unary request: the stream must carry one message
    _at_prefix = True
    _messages = 0
    _deadline: float | None = None

    def init_stream(self, stream_id: int, connection: Connection) -> None:
        super().init_stream(stream_id, connection)
        self._deadline = asyncio.get_running_loop().time() + self.limits.timeout

    async def recv_data(self, size: int) -> bytes:
        """The next prefix or body of a request message, as grpclib's recv_message asks for.

        Waits for the client's data: the first message until request_timeout after the stream
        opened, any later body until request_timeout after its prefix came."""
        if self._at_prefix:
            return await self._recv_prefix(size)
        data = await self._read(size, "a message")
        if len(data) < size:  # grpclib's Buffer.read gives b"" when the stream ended before
            raise GRPCError(
                Status.INVALID_ARGUMENT, "the request stream ended inside a message (truncated)"
            )
        self._at_prefix, self._deadline = True, None
        self._messages += 1
        return data

    async def _recv_prefix(self, size: int) -> bytes:
        prefix = await self._read(size, "a message prefix")
        if not prefix:
            if self.needs_message and self._messages == 0:
                raise GRPCError(Status.INVALID_ARGUMENT, "the request carries no message")
            return prefix
        check_prefix(prefix, self.limits.max_bytes)
        self._at_prefix = False
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.limits.timeout
        return prefix

    async def _read(self, size: int, what: str) -> bytes:
        try:
            async with asyncio.timeout_at(self._deadline):
                return await self.buffer.read(size)
        except TimeoutError:
            ratelog.info(
                "request-timeout",
                "gRPC: a request message from %s did not arrive within %g s",
                _peer(self),
                self.limits.timeout,
            )
            raise GRPCError(
                Status.DEADLINE_EXCEEDED,
                f"the request message did not arrive within {self.limits.timeout:g} s "
                "(server.request_timeout_seconds)",
            ) from None
        except AssertionError:  # grpclib's Buffer.read: the stream ended short of size
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the request stream ended inside {what} (truncated)"
            ) from None


def _peer(stream: Stream) -> str:
    try:
        address = stream.connection.get_peer().addr()
    except AttributeError:  # the connection is closed already
        address = None
    return f"{address[0]}:{address[1]}" if address else "a client"
