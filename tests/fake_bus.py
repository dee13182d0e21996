"""An in-memory stand-in for the v2 Publisher and Subscriber services, for testing the Python
client's own logic (batching, flow control, leases, reconnection, stopping) without the bus.

It keeps what the client sent in plain lists for the tests to read, and offers the few faults
the client must survive: a refused batch, a broken stream, a server that ignores flow control.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from eventbus._generated import v2_grpc, v2_pb2
from tests.servers import free_port


@dataclass
class FakeStream:
    """One StreamingPull stream as the fake sees it."""

    first: v2_pb2.StreamingPullRequest
    unacked: dict[str, v2_pb2.ReceivedMessage] = field(default_factory=dict)
    broken: asyncio.Event = field(default_factory=asyncio.Event)  # set: ends with break_status
    break_status: Status = Status.UNAVAILABLE
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set: ends with OK


class FakeBus(v2_grpc.PublisherBase, v2_grpc.SubscriberBase):
    def __init__(self) -> None:
        self.batches: list[list[v2_pb2.OutboundMessage]] = []
        self.refuse: Callable[[v2_pb2.PublishRequest], Status | None] = lambda request: None
        self.hold_publish: asyncio.Event | None = None  # set: Publish calls go on
        self.publishing = 0
        self.most_publishing = 0
        self.ready: deque[v2_pb2.ReceivedMessage] = deque()
        self.streams: list[FakeStream] = []
        self.refuse_streams: Status | None = None
        self.ignore_flow_control = False
        self.events: list[tuple[str, str]] = []  # ("ack" | "nack" | "extend" | "end", id)
        self.extensions: list[tuple[str, int]] = []
        self.changed = asyncio.Condition()
        self._ids = itertools.count(1)

    # ---- what tests call -------------------------------------------------------------------

    async def deliver(self, *datas: bytes, queue: str = "q") -> None:
        """Make messages ready for subscribers."""
        for data in datas:
            number = next(self._ids)
            self.ready.append(
                v2_pb2.ReceivedMessage(
                    ack_id=f"a{number}", message_id=f"m{number}", data=data, attempt=1, queue=queue
                )
            )
        await self.notify()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with self.changed:
            await self.changed.wait_for(predicate)

    def acked(self) -> list[str]:
        return [ack_id for kind, ack_id in self.events if kind == "ack"]

    def nacked(self) -> list[str]:
        return [ack_id for kind, ack_id in self.events if kind == "nack"]

    # ---- Publisher -------------------------------------------------------------------------

    async def Publish(self, stream: Stream[v2_pb2.PublishRequest, v2_pb2.PublishResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.batches.append(list(request.messages))
        self.publishing += 1
        self.most_publishing = max(self.most_publishing, self.publishing)
        await self.notify()
        try:
            if self.hold_publish is not None:
                await self.hold_publish.wait()
        finally:
            self.publishing -= 1
        status = self.refuse(request)
        if status is not None:
            raise GRPCError(status, "refused by the fake")
        results = [
            v2_pb2.PublishResult(message_id=f"id-{m.data.decode()}") for m in request.messages
        ]
        await stream.send_message(v2_pb2.PublishResponse(results=results))

    # ---- Subscriber: the stream ------------------------------------------------------------

    async def StreamingPull(
        self, stream: Stream[v2_pb2.StreamingPullRequest, v2_pb2.StreamingPullResponse]
    ) -> None:
        first = await stream.recv_message()
        assert first is not None
        if self.refuse_streams is not None:
            raise GRPCError(self.refuse_streams, "refused by the fake")
        fake = FakeStream(first)
        self.streams.append(fake)
        await self.notify()
        try:
            await self._serve(stream, fake)
        finally:
            await self._give_back(fake)

    async def _serve(self, stream: Stream, fake: FakeStream) -> None:  # type: ignore[type-arg]
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._feed(stream, fake)),
            loop.create_task(self._consume(stream, fake)),
            loop.create_task(fake.broken.wait()),
            loop.create_task(fake.finished.wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with suppress(BaseException):
                    await task
        if fake.broken.is_set():
            raise GRPCError(fake.break_status, "stream broken by the fake")

    def _room(self, fake: FakeStream) -> int:
        limit = fake.first.max_outstanding_messages or 100
        return len(self.ready) if self.ignore_flow_control else limit - len(fake.unacked)

    async def _feed(self, stream: Stream, fake: FakeStream) -> None:  # type: ignore[type-arg]
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: bool(self.ready) and self._room(fake) > 0)
                count = min(self._room(fake), len(self.ready))
                batch = [self.ready.popleft() for _ in range(count)]
                self.changed.notify_all()
            fake.unacked.update((m.ack_id, m) for m in batch)
            await stream.send_message(v2_pb2.StreamingPullResponse(messages=batch))

    async def _consume(self, stream: Stream, fake: FakeStream) -> None:  # type: ignore[type-arg]
        async for request in stream:
            self._apply(request, fake)
            await self.notify()
        self.events.append(("end", str(len(self.streams))))
        await self.notify()

    def _apply(self, request: v2_pb2.StreamingPullRequest, fake: FakeStream) -> None:
        for ack_id in request.ack_ids:
            self.events.append(("ack", ack_id))
            fake.unacked.pop(ack_id, None)
        for ack_id in request.nack_ids:
            self.events.append(("nack", ack_id))
            fake.unacked.pop(ack_id, None)
        seconds = list(request.modify_deadline_seconds)
        for i, ack_id in enumerate(request.modify_deadline_ack_ids):
            self.events.append(("extend", ack_id))
            self.extensions.append((ack_id, seconds[i] if len(seconds) > 1 else seconds[0]))

    async def _give_back(self, fake: FakeStream) -> None:
        """Unacked messages of an ended stream are ready again at once, as new deliveries."""
        for message in reversed(list(fake.unacked.values())):
            again = v2_pb2.ReceivedMessage()
            again.CopyFrom(message)
            again.ack_id = f"a{next(self._ids)}"
            again.attempt += 1
            self.ready.appendleft(again)
        fake.unacked.clear()
        await self.notify()

    # ---- Subscriber: unary calls -----------------------------------------------------------

    async def Pull(self, stream: Stream[v2_pb2.PullRequest, v2_pb2.PullResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        count = min(max(request.max_messages, 1), len(self.ready))
        messages = [self.ready.popleft() for _ in range(count)]
        await stream.send_message(v2_pb2.PullResponse(messages=messages))

    async def Acknowledge(
        self, stream: Stream[v2_pb2.AcknowledgeRequest, v2_pb2.AcknowledgeResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.events.extend(("ack", ack_id) for ack_id in request.ack_ids)
        invalid = [ack_id for ack_id in request.ack_ids if not ack_id.startswith("a")]
        await stream.send_message(v2_pb2.AcknowledgeResponse(invalid_ack_ids=invalid))

    async def Nack(self, stream: Stream[v2_pb2.NackRequest, v2_pb2.NackResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.events.extend(("nack", ack_id) for ack_id in request.ack_ids)
        await stream.send_message(v2_pb2.NackResponse())

    async def ModifyAckDeadline(
        self, stream: Stream[v2_pb2.ModifyAckDeadlineRequest, v2_pb2.ModifyAckDeadlineResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.extensions.extend((i, request.ack_deadline_seconds) for i in request.ack_ids)
        await stream.send_message(v2_pb2.ModifyAckDeadlineResponse())

    def __mapping__(self) -> dict[str, object]:  # type: ignore[override]
        return {
            **v2_grpc.PublisherBase.__mapping__(self),
            **v2_grpc.SubscriberBase.__mapping__(self),
        }


@asynccontextmanager
async def serving(fake: FakeBus) -> AsyncIterator[str]:
    """Serve the fake on a free local port; yields the client's target."""
    port = free_port()
    server = Server([fake])
    await server.start("127.0.0.1", port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
