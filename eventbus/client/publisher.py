"""The batching publisher: publish() queues a message and returns a future of its id; queued
messages leave in one Publisher.Publish call once max_messages or max_bytes is reached, or
max_latency after the first of them was queued, with at most max_batches_in_flight calls at a
time."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from grpclib.const import Status

from .._generated import v2_pb2
from .errors import PublishError, RpcError
from .messages import OutboundMessage, PublishResult

logger = logging.getLogger(__name__)

SendBatch = Callable[[list[v2_pb2.OutboundMessage]], Awaitable[list[PublishResult]]]


@dataclass(frozen=True)
class BatchLimits:
    """When a batch leaves: max_messages or max_bytes reached, or max_latency seconds after its
    first message; and how many batches may be on their way at once."""

    max_messages: int = 100
    max_bytes: int = 1024 * 1024
    max_latency: float = 0.01
    max_batches_in_flight: int = 4

    def __post_init__(self) -> None:
        if min(self.max_messages, self.max_bytes, self.max_batches_in_flight) < 1:
            raise ValueError("max_messages, max_bytes and max_batches_in_flight must be >= 1")
        if self.max_latency < 0:
            raise ValueError("max_latency must be >= 0")


def _mark_retrieved(future: asyncio.Future[str]) -> None:
    """A failure nobody awaits is logged once per batch (in _Batch.fail), not again by asyncio
    (under trio-asyncio an unretrieved future error would end the program)."""
    if not future.cancelled():
        future.exception()


@dataclass
class _Batch:
    messages: list[v2_pb2.OutboundMessage] = field(default_factory=list)
    futures: list[asyncio.Future[str]] = field(default_factory=list)
    size: int = 0

    def add(self, message: v2_pb2.OutboundMessage, future: asyncio.Future[str]) -> None:
        self.messages.append(message)
        self.futures.append(future)
        self.size += message.ByteSize()

    def resolve(self, results: list[PublishResult]) -> None:
        if len(results) != len(self.futures):
            detail = f"{len(results)} results for {len(self.futures)} messages"
            self.fail(RpcError(Status.INTERNAL, detail))
            return
        for future, result in zip(self.futures, results, strict=True):
            if not future.done():
                future.set_result(result.message_id)

    def fail(self, error: RpcError) -> None:
        logger.warning("publishing a batch of %d messages failed: %s", len(self.futures), error)
        for future in self.futures:
            if not future.done():
                future.set_exception(PublishError(error.status, error.details))

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


class Publisher:
    """Batches messages into Publisher.Publish calls; made by Client.publisher().

    `await publisher.publish(...)` waits for the message's id; `flush()` sends what is queued
    and waits for every batch on its way; `aclose()` (or leaving `async with`) refuses new
    messages, then flushes."""

    def __init__(self, send: SendBatch, limits: BatchLimits) -> None:
        self._send = send
        self._limits = limits
        self._batch = _Batch()
        self._ready: deque[_Batch] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def publish(
        self,
        *,
        data: bytes,
        queue: str = "",
        topic: str = "",
        attributes: Mapping[str, str] | None = None,
        ttl_seconds: int = 0,
        delay_seconds: int = 0,
        dedup_id: str = "",
    ) -> asyncio.Future[str]:
        """Queue a message for exactly one of queue and topic; the future gives its id, or
        fails with PublishError carrying the gRPC status of the batch's call."""
        message = OutboundMessage(
            data, queue, topic, attributes or {}, ttl_seconds, delay_seconds, dedup_id
        )
        return self.publish_message(message)

    def publish_message(self, message: OutboundMessage) -> asyncio.Future[str]:
        """publish() for a message already built."""
        if self._closed:
            raise RuntimeError("the publisher is closed")
        proto = message.to_proto()
        if self._batch.messages and self._batch.size + proto.ByteSize() > self._limits.max_bytes:
            self._seal()
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_mark_retrieved)
        self._batch.add(proto, future)
        self._after_add()
        return future

    def _after_add(self) -> None:
        batch, limits = self._batch, self._limits
        if len(batch.messages) >= limits.max_messages or batch.size >= limits.max_bytes:
            self._seal()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(limits.max_latency, self._seal)

    def _seal(self) -> None:
        """The batch being filled is done: queue it for sending."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._batch.messages:
            self._ready.append(self._batch)
            self._batch = _Batch()
            self._pump()

    def _pump(self) -> None:
        while self._ready and len(self._in_flight) < self._limits.max_batches_in_flight:
            task = asyncio.get_running_loop().create_task(self._deliver(self._ready.popleft()))
            self._in_flight.add(task)
            task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._pump()

    async def _deliver(self, batch: _Batch) -> None:
        """Send one batch and settle its futures; waits on the Publish call."""
        try:
            results = await self._send(batch.messages)
        except RpcError as error:
            batch.fail(error)
        except asyncio.CancelledError:
            batch.cancel()
            raise
        except Exception as error:
            logger.exception("publishing a batch failed unexpectedly")
            batch.fail(RpcError(Status.UNKNOWN, repr(error)))
        else:
            batch.resolve(results)

    async def flush(self) -> None:
        """Send what is queued now; wait until every batch sent so far has its answer."""
        self._seal()
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def aclose(self) -> None:
        """Refuse further messages, then flush."""
        self._closed = True
        await self.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
