"""The streaming subscriber: one Subscriber.StreamingPull stream per subscription, an async
handler per message, flow control, acks and lease extensions on the stream, reconnection.

A Subscription runs a _Stream after another: each reads messages and starts a handler for each
(never more than max_outstanding_messages at once, across streams), sends what the handlers
settle in batches, and extends the deadlines of unsettled messages. When a stream breaks with a
retryable status the next one opens after a backoff; what the handlers of the broken stream
settle is dropped, since the bus gives those messages out again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from grpclib.client import Stream
from grpclib.const import Status

from .._generated import v2_grpc, v2_pb2
from .errors import RpcError, translated
from .leases import Leases, Pending
from .messages import Message
from .retry import backoff_delay, is_retryable

logger = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[None]]
GrpcStream = Stream[v2_pb2.StreamingPullRequest, v2_pb2.StreamingPullResponse]

SEND_EVERY = 0.01  # seconds an ack, nack or extension may wait for others to share its request
SEND_AT = 100  # ids pending that are sent at once
CLOSE_TIMEOUT = 5.0  # seconds the server has to end the stream after ours ended


@dataclass(frozen=True)
class SubscriberSettings:
    """What a subscription asks for: the queue (with topic: the subscriber group bound to it),
    flow control, the ack deadline and its extensions, the backoff between streams."""

    queue: str
    topic: str = ""
    max_outstanding_messages: int = 100
    ack_deadline_seconds: int = 60
    max_lease_seconds: float = 1500.0  # the daemon holds a delivery 25 minutes at most
    retry_initial_seconds: float = 0.1
    retry_max_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not self.queue:
            raise ValueError("queue must not be empty")
        if not 1 <= self.max_outstanding_messages <= 1_000_000:
            raise ValueError("max_outstanding_messages must be 1-1000000")
        if self.ack_deadline_seconds < 1:
            raise ValueError("ack_deadline_seconds must be >= 1")

    def first_request(self) -> v2_pb2.StreamingPullRequest:
        return v2_pb2.StreamingPullRequest(
            queue=self.queue,
            topic=self.topic,
            max_outstanding_messages=self.max_outstanding_messages,
            ack_deadline_seconds=self.ack_deadline_seconds,
        )


class _Stop:
    """A stop asked for, and how long running handlers may still take."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.grace = 30.0

    def __bool__(self) -> bool:
        return self.requested.is_set()


class _Closed(Exception):
    """The stream was given up on purpose (stopped before it opened, or the server did not
    end it in time); leaving the stream's context with it resets the stream."""


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    """Cancel the tasks and wait until they are done, whatever they ended with."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


class _Workers:
    """The handlers of one subscription, across its streams: never more running than its
    max_outstanding_messages."""

    def __init__(self, handler: Handler, limit: int) -> None:
        self._handler = handler
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def acquire(self) -> None:
        """Wait for room for one more handler."""
        await self._slots.acquire()

    def release(self) -> None:
        self._slots.release()

    def start(self, message: Message) -> None:
        """Run the handler for a message, in a slot taken by acquire()."""
        task = asyncio.get_running_loop().create_task(self._run(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, message: Message) -> None:
        try:
            await self._handler(message)
        except Exception:
            logger.warning(
                "handler failed on message %s (attempt %d) of %s; nacked",
                message.message_id,
                message.attempt,
                message.queue,
                exc_info=True,
            )
            message.nack()
        else:
            message.ack()
        finally:
            self._slots.release()

    async def finish(self, grace: float) -> None:
        """Wait for the running handlers, at most `grace` seconds; cancel those still running
        then (their messages come back)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._tasks:
            logger.warning("%d handlers still running after %.1f s: cancelled", len(self), grace)
            await _cancel(*self._tasks)


class _Stream:
    """One StreamingPull stream: messages in, handlers started, settlements and lease
    extensions out."""

    def __init__(self, settings: SubscriberSettings, workers: _Workers, grpc: GrpcStream) -> None:
        self.settings = settings
        self.workers = workers
        self.grpc = grpc
        self.leases = Leases(settings.ack_deadline_seconds, settings.max_lease_seconds)
        self.pending = Pending()
        self.opened = asyncio.Event()
        self.healthy = False  # a message came: the next failure starts the backoff afresh
        self._loop = asyncio.get_running_loop()
        self._wake_sender = asyncio.Event()
        self._lease_added = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # stopping: messages that arrive now are not handled
        self._finishing = False  # stopping: the sender sends what is pending, then returns
        self._live = True  # settlements are sent; once false they are dropped

    async def serve(self, stop_request: _Stop) -> None:
        """Run the stream until it fails (raising) or a stop is asked for (then drain it)."""
        reader = self._loop.create_task(self._read())
        sender = self._loop.create_task(self._send())
        leaser = self._loop.create_task(self._extend())
        stop = self._loop.create_task(self._wait_stop(stop_request.requested))
        try:
            await asyncio.wait((reader, sender, leaser, stop), return_when=asyncio.FIRST_COMPLETED)
            if not stop.done():
                await self._broken(reader, sender, leaser)
            await self._drain(reader, sender, leaser, stop_request.grace)
        finally:
            self._live = False
            await _cancel(reader, sender, leaser, stop)

    @staticmethod
    async def _wait_stop(stopping: asyncio.Event) -> None:
        await stopping.wait()

    async def _broken(self, *tasks: asyncio.Task[None]) -> None:
        """A task ended before any stop: raise why the stream is over."""
        self._live = False
        for task in tasks:
            if task.done():
                task.result()  # raises what ended it
        await _cancel(*tasks[1:])
        await self._ended_by_server()

    async def _ended_by_server(self) -> None:
        """The server ended the stream without being asked: its status, or UNAVAILABLE."""
        await self._end_quietly()
        await self.grpc.recv_trailing_metadata()
        raise RpcError(Status.UNAVAILABLE, "the server ended the stream")

    async def _end_quietly(self) -> None:
        """End our side of a stream the server ended; it may have reset it already, which
        leaves nothing to end."""
        with contextlib.suppress(Exception):
            await self.grpc.end()

    async def _drain(
        self,
        reader: asyncio.Task[None],
        sender: asyncio.Task[None],
        leaser: asyncio.Task[None],
        grace: float,
    ) -> None:
        """Stop: let the handlers finish, send what they settled, end the stream, and wait
        (bounded) for the server to end it too."""
        self._closing = True
        await self.workers.finish(grace)
        await _cancel(leaser)
        if not self.opened.is_set():
            raise _Closed("stopped before the stream opened")
        self._finishing = True
        self._wake_sender.set()
        await sender
        if reader.done():  # the server ended the stream first
            await self._end_quietly()
        else:
            await self.grpc.end()
        done, _ = await asyncio.wait((reader,), timeout=CLOSE_TIMEOUT)
        if not done:
            raise _Closed(f"the server did not end the stream within {CLOSE_TIMEOUT} s")
        reader.result()

    async def _read(self) -> None:
        """Open the stream, then hand each message that arrives to a handler; returns when the
        server ends the stream."""
        await self.grpc.send_message(self.settings.first_request())
        self.opened.set()
        while (response := await self.grpc.recv_message()) is not None:
            self.healthy = True
            for received in response.messages:
                await self._dispatch(received)
            if response.invalid_ack_ids:
                logger.debug("%d ack ids were no longer current", len(response.invalid_ack_ids))

    async def _dispatch(self, received: v2_pb2.ReceivedMessage) -> None:
        """Start a handler for the message once there is room for it; waits for that room."""
        if self._closing:
            return  # not handled: it comes back once the stream ends
        message = Message.delivered(received, self._settle)
        self.leases.add(message.ack_id, self._loop.time())
        self._lease_added.set()
        await self.workers.acquire()
        if self._closing:
            self.workers.release()
            self.leases.remove(message.ack_id)
            return
        self.workers.start(message)

    def _settle(self, message: Message, ack: bool) -> None:
        """A handler acked or nacked: queue it for the stream, or drop it if the stream is
        gone (the bus gives the message out again)."""
        if not self._live:
            logger.debug("stream gone: %s for %s dropped", "ack" if ack else "nack", message.ack_id)
            return
        self.leases.remove(message.ack_id)
        (self.pending.acks if ack else self.pending.nacks).append(message.ack_id)
        self._sender_due()

    def _sender_due(self) -> None:
        if len(self.pending) >= SEND_AT:
            self._wake_sender.set()
        elif self._timer is None:
            self._timer = self._loop.call_later(SEND_EVERY, self._wake_sender.set)

    async def _send(self) -> None:
        """Send pending settlements and extensions, in one request per wake-up."""
        await self.opened.wait()
        while True:
            await self._wake_sender.wait()
            self._wake_sender.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            request = self.pending.take(self.settings.ack_deadline_seconds)
            if request is not None:
                await self.grpc.send_message(request)
            if self._finishing and not self.pending:
                return

    async def _extend(self) -> None:
        """Extend each unsettled message's deadline when its lease is due; waits on the
        earliest lease."""
        while True:
            due = self.leases.next_due()
            if due is None:
                self._lease_added.clear()
                await self._lease_added.wait()
                continue
            await asyncio.sleep(max(0.0, due - self._loop.time()))
            extend = self.leases.take_due(self._loop.time())
            if extend:
                self.pending.extensions.extend(extend)
                self._sender_due()


class Subscription:
    """A running subscription, made by Client.subscribe(): `await stop()` ends it gracefully,
    `await wait()` waits until it ends; `async with` stops it on leaving. Both raise the
    error that ended it, if one did (a status that retrying cannot fix)."""

    def __init__(
        self, stub: v2_grpc.SubscriberStub, handler: Handler, settings: SubscriberSettings
    ) -> None:
        self.settings = settings
        self._stub = stub
        self._workers = _Workers(handler, settings.max_outstanding_messages)
        self._stop = _Stop()
        self._error: Exception | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def stop(self, grace: float = 30.0) -> None:
        """Stop pulling, give running handlers up to `grace` seconds to finish (then cancel
        them), send their acks, end the stream; waits for all of that."""
        self._stop.grace = grace
        self._stop.requested.set()
        await self.wait()

    def cancel(self) -> None:
        """Ask the subscription to end without waiting and without grace for running handlers
        (they are cancelled); `await wait()` for it to be over."""
        self._stop.grace = 0.0
        self._stop.requested.set()

    async def wait(self) -> None:
        """Wait until the subscription ends; raise the error that ended it, if any."""
        await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        try:
            await self._pull()
        except Exception as error:
            logger.exception("subscriber of %s failed", self.settings.queue)
            self._error = error
        finally:
            await self._workers.finish(self._stop.grace)

    async def _pull(self) -> None:
        """Open a stream after another until stopped or failed for good."""
        failures = 0
        while not self._stop:
            healthy, error = await self._stream_once()
            if error is None:
                return
            if self._stop or not is_retryable(error.status):
                self._end_with(error)
                return
            failures = 1 if healthy else failures + 1
            await self._back_off(failures, error)

    async def _stream_once(self) -> tuple[bool, RpcError | None]:
        """One stream, to its end: whether it delivered anything, and what broke it."""
        stream: _Stream | None = None
        try:
            with translated():
                async with self._stub.StreamingPull.open() as grpc:
                    stream = _Stream(self.settings, self._workers, grpc)
                    await stream.serve(self._stop)
        except _Closed as closed:
            logger.debug("subscriber of %s: %s", self.settings.queue, closed)
        except RpcError as error:
            return stream is not None and stream.healthy, error
        return True, None

    def _end_with(self, error: RpcError) -> None:
        if self._stop:
            logger.warning(
                "subscriber of %s: stream failed while stopping: %s", self.settings.queue, error
            )
            return
        logger.error("subscriber of %s: %s; not retried", self.settings.queue, error)
        self._error = error

    async def _back_off(self, failures: int, error: RpcError) -> None:
        """Wait before the next stream, or until stopped."""
        settings = self.settings
        delay = backoff_delay(failures, settings.retry_initial_seconds, settings.retry_max_seconds)
        logger.warning(
            "subscriber of %s: stream broke (%s); opening it again in %.2f s",
            settings.queue,
            error,
            delay,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.requested.wait(), delay)
