"""The gRPC server (grpclib) and the gate every call passes through.

grpclib is an asyncio library: its handlers run on the asyncio side of the seam and cross to trio
for the work. The gate counts calls in flight so shutdown can drain them, turns typed errors into
status codes in one place, and makes sure a bug reaches the client as INTERNAL, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import trio
from grpclib.const import Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Stream

from ..backends import aio
from ..errors import CallError, PermissionDenied, Unauthenticated
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from ..security.access import NOBODY, Access, Identity, reset_caller, set_caller
from .h2limits import GuardedServer, Limits

logger = logging.getLogger(__name__)
# Refusals with who, from where, what: at most one line a minute per method, code and identity.
audit = RateLimitedLog(logging.getLogger("eventbus.audit"))

Request = TypeVar("Request")
Reply = TypeVar("Reply")

CLOSE_TIMEOUT = 5.0
DEADLINE_SLACK = 0.1  # seconds


class Gate:
    """Admits calls while serving, counts them, and maps their errors to status codes."""

    def __init__(
        self, metrics: Metrics, max_calls: int = 10_000, access: Access | None = None
    ) -> None:
        self.metrics = metrics
        self.access = access  # None: every caller may do everything (auth.mode "off")
        self.max_calls = max_calls
        self.draining = False
        self.stopping = asyncio.Event()  # set with draining: long-lived calls end themselves
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def unary(
        self,
        stream: Stream[Request, Reply],
        method: str,
        work: Callable[[Request], Awaitable[Reply]],
    ) -> None:
        """Handle one unary call: receive, run work (asyncio side), send the reply."""

        async def once() -> None:
            request = await stream.recv_message()
            assert request is not None  # framing.FramedStream refuses a unary call without one
            await stream.send_message(await work(request))

        await self.call(stream, method, once)

    async def call(
        self, stream: Stream[Any, Any], method: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Admit a call (any cardinality), run work, which talks on the stream itself, and map
        its errors to a status code."""
        if self.draining:
            raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
        if self.in_flight >= self.max_calls:
            self.metrics.grpc_requests.labels(method, Status.RESOURCE_EXHAUSTED.name).inc()
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"{self.in_flight} calls in flight (server.max_concurrent_calls); retry later",
            )
        identity = self._authenticate(stream, method)
        self._enter()
        code = Status.OK
        token = set_caller(identity)
        try:
            await work()
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            code = _cancelled_code(stream)
            raise
        except CallError as error:
            if _being_cancelled():  # the error is a consequence of the cancellation
                code = _cancelled_code(stream)
                raise asyncio.CancelledError from None
            code = error.status
            if isinstance(error, PermissionDenied):
                self._refused(stream, method, identity, error)
            raise GRPCError(error.status, error.message) from None
        except GRPCError as error:
            code = error.status
            raise
        except Exception:
            code = Status.INTERNAL
            logger.exception("gRPC %s failed", method)
            raise GRPCError(Status.INTERNAL, "internal error") from None
        finally:
            reset_caller(token)
            self._leave(method, code)

    def _authenticate(self, stream: Stream[Any, Any], method: str) -> Identity:
        """The caller's identity, or UNAUTHENTICATED (counted, logged at most once a minute
        per method and reason)."""
        if self.access is None or not self.access.enabled:
            return NOBODY
        try:
            return self.access.authenticate(stream.metadata or {}, _certificate(stream))
        except Unauthenticated as error:
            self.metrics.grpc_requests.labels(method, error.status.name).inc()
            self._refused(stream, method, None, error)
            raise GRPCError(error.status, error.message) from None

    def audit_action(
        self, stream: Stream[Any, Any], method: str, identity: Identity, target: str
    ) -> None:
        """An admin action: counted, and logged with who, from where, what and on what."""
        self.metrics.admin_actions.labels(method, identity.name or "-").inc()
        audit.info(
            f"{method} {identity.name} {target}",  # the same action again: once a minute
            "admin: %s from %s: %s on %s",
            f"identity {identity.name}" if identity.name else "a caller (auth off)",
            peer_of(stream),
            method,
            target,
        )

    def _refused(
        self, stream: Stream[Any, Any], method: str, identity: Identity | None, error: CallError
    ) -> None:
        self.metrics.auth_refusals.labels(method, error.status.name).inc()
        who = f"identity {identity.name}" if identity is not None else "a caller"
        audit.warning(
            f"{method} {error.status.name} {who}",
            "auth: %s from %s: %s refused: %s",
            who,
            peer_of(stream),
            method,
            error.message,
        )

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.metrics.grpc_in_flight.inc()

    def _leave(self, method: str, code: Status) -> None:
        self.in_flight -= 1
        self.metrics.grpc_in_flight.dec()
        self.metrics.grpc_requests.labels(method, code.name).inc()
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, grace: float) -> int:
        """Refuse new calls and wait up to grace seconds for those in flight; returns how many
        were still running when the grace period ended."""
        self.draining = True
        self.stopping.set()
        with trio.move_on_after(grace):
            await self._idle.wait()
        return self.in_flight


def _certificate(stream: Stream[Any, Any]) -> dict[str, Any] | None:
    try:
        return stream.peer.cert()
    except AttributeError:  # the connection is closed already
        return None


def peer_of(stream: Stream[Any, Any]) -> str:
    """The client's address as host:port, for log lines."""
    try:
        address = stream.peer.addr()
    except AttributeError:  # the connection is closed already
        address = None
    return f"{address[0]}:{address[1]}" if address else "a client"


def _being_cancelled() -> bool:
    """Whether grpclib is cancelling the running handler (its client left, or its deadline
    passed): an error it then raises is answered as a cancellation, which grpclib expects,
    rather than logged by grpclib as a failure to handle it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancelled_code(stream: Stream[Any, Any]) -> Status:
    """How a call that grpclib cancelled ended: its deadline passed, or its client left.

    A client resets its call when its own deadline passes, which comes a transit time before
    ours (the grpc-timeout header counts from when it was sent): a reset within DEADLINE_SLACK
    of the deadline is the deadline."""
    deadline = stream.deadline
    if deadline is not None and deadline.time_remaining() <= DEADLINE_SLACK:
        return Status.DEADLINE_EXCEEDED
    return Status.CANCELLED


class GrpcServer:
    """The listening grpclib server with health and reflection services beside the bus's own."""

    def __init__(
        self,
        services: Collection[Any],
        gate: Gate,
        codec: CodecBase,
        limits: Limits,
        *,
        reflection: bool = True,
    ) -> None:
        self.gate = gate
        self.status = ServiceStatus()
        health = Health({service: [self.status] for service in services})
        handlers = [*services, health]
        if reflection:
            handlers = ServerReflection.extend(handlers)
        self._server = GuardedServer(handlers, codec=codec, limits=limits)
        self._closed = False

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        await aio.call(self._server.start, host, port, ssl=tls)
        self.status.set(True)

    async def stop(self, grace: float) -> None:
        """Drain calls in flight for at most grace seconds, then close every connection."""
        started = time.monotonic()
        self.status.set(False)
        left = await self.gate.drain(grace)
        if left:
            logger.warning(
                "gRPC: %d calls still running after %.1f s; cancelling them", left, grace
            )
        await self.close()
        logger.info("gRPC: stopped in %.2f s", time.monotonic() - started)

    async def close(self) -> None:
        """Stop listening and cancel whatever calls remain; waits at most CLOSE_TIMEOUT."""
        if self._closed:
            return
        self._closed = True
        self.gate.draining = True
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            self._server.close()
            await aio.call(self._server.wait_closed)


async def run(
    server: GrpcServer,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port (over TLS with a context) until cancelled; the daemon drains calls
    with stop() before that."""
    await server.start(host, port, tls)
    logger.info("gRPC: serving on %s:%d%s", host, port, " over TLS" if tls else "")
    try:
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        await server.close()
