"""A bounded workload over gRPC (grpclib), spread over several daemons, recording a History.

v1: publishers call mq.Mq/publish one message at a time; subscribers call subscribe, then ack.
v2: publishers send Publisher.Publish batches (half of them with a dedup_id on every message,
as a careful client would); StreamingPull streams receive and ack on the stream.
Every message carries a unique id at the start of its body. A publish answered with an error is
retried as a client would: the same message (the same batch), after a pause, on the next daemon,
until it is answered OK or the retry time is over. Fault steps run in threads at their times;
once publishing has ended and the faults are healed, the subscribers drain the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from eventbus._generated import mq_grpc, mq_pb2, v2_grpc, v2_pb2
from tests.cluster.history import OK, History

BODY_BYTES = 64
EMPTY_WAIT = 2.0  # seconds a v1 subscribe waits for a message
ACK_EVERY = 0.05  # seconds between two requests carrying a stream's acks


@dataclass(frozen=True)
class Shape:
    """How much load, for how long, and how patient the clients are."""

    v1_publishers: int = 3
    v1_rate: float = 30.0  # messages a second, each publisher
    v2_publishers: int = 2
    v2_batch: int = 20
    v2_rate: float = 150.0  # messages a second, each publisher
    v1_subscribers: int = 4
    v2_streams: int = 2
    load_seconds: float = 30.0  # publishers start new messages until then
    retry_seconds: float = 25.0  # a message still failing at load end is retried this much longer
    drain_seconds: float = 60.0  # at most, once publishing and the faults are over
    quiet_seconds: float = 3.0  # every confirmed message delivered and nothing new for this long
    call_timeout: float = 10.0  # deadline of one publish call
    stream_ack_deadline: int = 10
    stream_outstanding: int = 200


@dataclass(frozen=True)
class Step:
    """A fault step: action (blocking) runs in a thread at `at` seconds, or after the previous
    step if that ends later."""

    at: float
    name: str
    action: Callable[[], object]


@dataclass(frozen=True)
class Queues:
    v1: str
    v2: str


def body(message_id: str) -> str:
    return f"{message_id} ".ljust(BODY_BYTES, "x")


def message_id(data: str | bytes) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text.split(" ", 1)[0]


class Rotor:
    """One client's channels to every daemon; calls go to the current one, an error moves on."""

    def __init__(self, addresses: Sequence[tuple[str, int]], start: int) -> None:
        self.channels = [Channel(host, port) for host, port in addresses]
        self.index = start % len(self.channels)

    @property
    def channel(self) -> Channel:
        return self.channels[self.index]

    def next(self) -> None:
        self.index = (self.index + 1) % len(self.channels)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


async def answer(call: Awaitable[Any], limit: float) -> tuple[str, Any]:
    """(OK, reply) or (the error's name, None): a status name, "timeout" or the exception's
    class."""
    try:
        return OK, await asyncio.wait_for(call, limit)
    except GRPCError as error:
        return error.status.name, None
    except TimeoutError:
        return "timeout", None
    except Exception as error:
        return type(error).__name__, None


class Workload:
    """One run of the workload against addresses, recording into history."""

    def __init__(self, addresses: Sequence[tuple[str, int]], queues: Queues, shape: Shape) -> None:
        self.addresses = list(addresses)
        self.queues = queues
        self.shape = shape
        self.history = History()
        self.rotors: list[Rotor] = []

    def rotor(self, start: int) -> Rotor:
        rotor = Rotor(self.addresses, start)
        self.rotors.append(rotor)
        return rotor

    async def run(self, steps: Sequence[Step]) -> History:
        """Publish for load_seconds while steps run, then drain; the History."""
        try:
            async with asyncio.TaskGroup() as tasks:
                subscribers = self.start_subscribers(tasks)
                stepping = tasks.create_task(self.run_steps(steps))
                async with asyncio.TaskGroup() as publishers:
                    self.start_publishers(publishers)
                self.history.load_ended = self.shape.load_seconds
                self.history.publish_ended = self.history.now()
                await stepping
                await self.drain()
                for task in subscribers:
                    task.cancel()
        finally:
            for rotor in self.rotors:
                rotor.close()
        return self.history

    def start_subscribers(self, tasks: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        shape = self.shape
        started = [tasks.create_task(self.v1_subscriber(i)) for i in range(shape.v1_subscribers)]
        started += [tasks.create_task(self.v2_stream(i)) for i in range(shape.v2_streams)]
        return started

    def start_publishers(self, tasks: asyncio.TaskGroup) -> None:
        for i in range(self.shape.v1_publishers):
            tasks.create_task(self.v1_publisher(i))
        for i in range(self.shape.v2_publishers):
            tasks.create_task(self.v2_publisher(i, dedup=i % 2 == 0))

    async def run_steps(self, steps: Sequence[Step]) -> None:
        for step in steps:
            await asyncio.sleep(max(0.0, step.at - self.history.now()))
            began = self.history.now()
            done = await asyncio.to_thread(step.action)
            name = f"{step.name}: {done}" if isinstance(done, str) else step.name
            self.history.mark(name, began, self.history.now())

    async def drain(self) -> None:
        """Until every confirmed message was delivered and nothing arrived for quiet_seconds,
        or drain_seconds passed."""
        history, shape = self.history, self.shape
        deadline = history.now() + shape.drain_seconds
        while history.now() < deadline:
            await asyncio.sleep(0.5)
            quiet = history.now() - history.last_delivery() >= shape.quiet_seconds
            if quiet and history.undelivered_confirmed() == 0:
                break
        history.drain_ended = history.now()

    async def paced(self, rate: float, send: Callable[[int], Awaitable[None]]) -> None:
        """send(0), send(1), ... at rate a second (never faster; late ones are not caught up)
        until load_seconds."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        for seq in itertools.count():
            if self.history.now() >= self.shape.load_seconds:
                return
            await send(seq)
            due = max(due + 1 / rate, loop.time() - 1 / rate)
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def until_ok(
        self, rotor: Rotor, ids: list[str], api: str, call: Callable[[Channel], Awaitable[Any]]
    ) -> None:
        """call on the rotor's current channel until it is answered OK, or the retry time is
        over; every answer recorded for every id."""
        pause = 0.2
        retry_until = self.shape.load_seconds + self.shape.retry_seconds
        for one in ids:
            self.history.sending(one, api)
        while True:
            outcome, _ = await answer(call(rotor.channel), self.shape.call_timeout + 2)
            for one in ids:
                self.history.attempted(one, api, outcome)
            if outcome == OK or self.history.now() >= retry_until:
                return
            rotor.next()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def v1_publisher(self, worker: int) -> None:
        rotor = self.rotor(worker)
        timeout = self.shape.call_timeout

        async def send(seq: int) -> None:
            one = f"v1-{worker}-{seq}"
            request = mq_pb2.PublishRequest(queue=self.queues.v1, data=body(one))
            await self.until_ok(
                rotor, [one], "v1", lambda ch: mq_grpc.MqStub(ch).publish(request, timeout=timeout)
            )

        await self.paced(self.shape.v1_rate, send)

    async def v2_publisher(self, worker: int, dedup: bool) -> None:
        rotor = self.rotor(worker + 1)
        shape = self.shape

        async def send(seq: int) -> None:
            ids = [f"v2-{worker}-{seq}-{k}" for k in range(shape.v2_batch)]
            request = v2_pb2.PublishRequest(
                messages=[
                    v2_pb2.OutboundMessage(
                        queue=self.queues.v2,
                        data=body(one).encode(),
                        dedup_id=one if dedup else "",
                    )
                    for one in ids
                ]
            )
            await self.until_ok(
                rotor,
                ids,
                "v2",
                lambda ch: v2_grpc.PublisherStub(ch).Publish(request, timeout=shape.call_timeout),
            )

        await self.paced(shape.v2_rate / shape.v2_batch, send)

    async def v1_subscriber(self, worker: int) -> None:
        rotor = self.rotor(worker)
        request = mq_pb2.SubscribeRequest(queue=self.queues.v1)
        while True:
            stub = mq_grpc.MqStub(rotor.channel)
            outcome, reply = await answer(
                stub.subscribe(request, timeout=EMPTY_WAIT), EMPTY_WAIT + 2
            )
            if outcome in ("DEADLINE_EXCEEDED", "timeout"):
                continue
            if outcome != OK:
                rotor.next()
                await asyncio.sleep(0.3)
                continue
            one = message_id(reply.data)
            self.history.delivered(one)
            await self.v1_ack(rotor, reply.id, one)

    async def v1_ack(self, rotor: Rotor, delivery_id: str, one: str) -> None:
        """Ack delivery_id, trying each daemon in turn (at most 3 attempts): acks are
        idempotent."""
        for _ in range(3):
            call = mq_grpc.MqStub(rotor.channel).ack(mq_pb2.QueueId(id=delivery_id), timeout=5)
            outcome, _ = await answer(call, 7)
            if outcome == OK:
                self.history.acked(one)
                return
            rotor.next()
            await asyncio.sleep(0.2)

    async def v2_stream(self, worker: int) -> None:
        """One StreamingPull at a time, reopened on the next daemon whenever it breaks."""
        rotor = self.rotor(worker)
        while True:
            with contextlib.suppress(Exception):  # the daemon went away: the next one
                await self.one_stream(rotor.channel)
            rotor.next()
            await asyncio.sleep(0.5)

    async def one_stream(self, channel: Channel) -> None:
        shape = self.shape
        first = v2_pb2.StreamingPullRequest(
            queue=self.queues.v2,
            max_outstanding_messages=shape.stream_outstanding,
            ack_deadline_seconds=shape.stream_ack_deadline,
        )
        pending: list[tuple[str, str]] = []  # (ack id, message id) received, not yet acked

        async with v2_grpc.SubscriberStub(channel).StreamingPull.open() as stream:
            await stream.send_message(first)

            async def read() -> None:
                while (response := await stream.recv_message()) is not None:
                    for received in response.messages:
                        one = message_id(received.data)
                        self.history.delivered(one)
                        pending.append((received.ack_id, one))
                raise ConnectionError("the server ended the stream")

            async def ack() -> None:
                while True:
                    await asyncio.sleep(ACK_EVERY)
                    if pending:
                        batch = pending[:]
                        del pending[:]
                        ack_ids = [ack_id for ack_id, _ in batch]
                        await stream.send_message(v2_pb2.StreamingPullRequest(ack_ids=ack_ids))
                        for _, one in batch:
                            self.history.acked(one)

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(read())
                tasks.create_task(ack())


def run(
    addresses: Sequence[tuple[str, int]],
    queues: Queues,
    shape: Shape,
    steps: Sequence[Step] = (),
) -> History:
    """Run the workload (blocking) and return its History."""
    return asyncio.run(Workload(addresses, queues, shape).run(steps))
