"""What the v2 benchmarks share: a daemon on backends of the run's own, grpclib clients of the v2
contract, aio-pika's baseline, the command line, tables of figures and their JSON.

Every benchmark measures aio-pika straight to RabbitMQ before the daemon starts and again after
it stops (the baseline is the mean of the two), and the bus in between, so each figure stands
beside a baseline from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from grpclib.client import Channel, Stream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_direct import bench_backends, start_daemon  # noqa: E402
from eventbus._generated import v2_grpc, v2_pb2  # noqa: E402

BODY_BYTES = 100
ACK_EVERY = 0.005  # seconds between two requests carrying a stream's acks
CONNECTIONS = 4  # HTTP/2 connections a benchmark's grpclib calls are spread over
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"


@dataclass(frozen=True)
class Bus:
    """A running daemon: its gRPC port and process id."""

    port: int
    pid: int


def arguments(
    doc: str | None, seconds: float, batches: tuple[int, ...], **numbers: float
) -> argparse.Namespace:
    """The command line every v2 benchmark takes, plus a --NAME option for each of numbers (its
    default)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=seconds, help="length of each figure")
    parser.add_argument(
        "--batches",
        type=lambda text: tuple(int(n) for n in text.split(",")),
        default=batches,
        help="messages per Publish call, comma-separated (default: %(default)s)",
    )
    for name, default in numbers.items():
        parser.add_argument(f"--{name}", type=float, default=default)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--profile", type=Path, help="record the daemon with py-spy (raw stacks) to this file"
    )
    return parser.parse_args()


@dataclass(frozen=True)
class Backends:
    """The run's own RabbitMQ vhost (its AMQP URL), database and Redis prefix."""

    url: str
    dsn: str
    prefix: str


@contextlib.contextmanager
def backends() -> Iterator[Backends]:
    """Backends of the run's own, removed afterwards."""
    with bench_backends() as (url, dsn, prefix):
        yield Backends(url, dsn, prefix)


@contextlib.contextmanager
def daemon(run: Backends, profile: Path | None = None) -> Iterator[Bus]:
    """`eventbus serve` on the run's backends for the duration; with profile, py-spy records it
    all along."""
    with tempfile.TemporaryDirectory() as tmp:
        process, port = start_daemon(run.url, run.dsn, run.prefix, Path(tmp))
        try:
            with profiled(process.pid, profile):
                yield Bus(port, process.pid)
        finally:
            process.terminate()
            process.wait(30)


@contextlib.contextmanager
def profiled(pid: int, path: Path | None) -> Iterator[None]:
    """py-spy recording pid into path (collapsed stacks, one line each) until the block ends."""
    if path is None:
        yield
        return
    command = [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "-o", str(path)]
    spy = subprocess.Popen([*command, "--rate", "200", "--nonblocking"])
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process pid has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def body(stamp: float | None = None) -> bytes:
    """A BODY_BYTES message body; with stamp (time.perf_counter() seconds), starting with it in
    nanoseconds, for sent_at()."""
    head = b"" if stamp is None else str(int(stamp * 1e9)).encode() + b" "
    return head.ljust(BODY_BYTES, b"x")


def sent_at(data: bytes) -> float:
    """The stamp (time.perf_counter() seconds) of a body made by body(stamp)."""
    return int(data.split(b" ", 1)[0]) / 1e9


def outbound(queue: str, count: int) -> v2_pb2.PublishRequest:
    return v2_pb2.PublishRequest(
        messages=[v2_pb2.OutboundMessage(queue=queue, data=body()) for _ in range(count)]
    )


def stamped(queue: str, count: int, spacing: float) -> v2_pb2.PublishRequest:
    """count messages to queue stamped as if queued by a batching client spacing seconds apart,
    the last one now: each stamp is when its message would have been queued."""
    now = time.perf_counter()
    stamps = [now - (count - 1 - k) * spacing for k in range(count)]
    return v2_pb2.PublishRequest(
        messages=[v2_pb2.OutboundMessage(queue=queue, data=body(stamp)) for stamp in stamps]
    )


async def publish_batches(
    port: int, queue: str, batch: int, seconds: float, in_flight: int
) -> tuple[int, float]:
    """in_flight callers (grpclib, over CONNECTIONS connections) each publishing batches of batch
    messages to queue, one call after another, for seconds: (messages stored, seconds taken)."""
    channels = [Channel("127.0.0.1", port) for _ in range(CONNECTIONS)]
    stubs = [v2_grpc.PublisherStub(channel) for channel in channels]
    request = outbound(queue, batch)
    started = time.monotonic()
    try:
        calls = await asyncio.gather(
            *(_caller(stubs[i % CONNECTIONS], request, started + seconds) for i in range(in_flight))
        )
    finally:
        for channel in channels:
            channel.close()
    return sum(calls) * batch, time.monotonic() - started


async def _caller(stub: v2_grpc.PublisherStub, request: v2_pb2.PublishRequest, stop: float) -> int:
    calls = 0
    while time.monotonic() < stop:
        reply = await stub.Publish(request)
        if len(reply.results) != len(request.messages):
            raise RuntimeError("Publish answered with fewer results than messages")
        calls += 1
    return calls


class Tally:
    """A count to wait on, and when it last grew (time.monotonic())."""

    def __init__(self) -> None:
        self.value = 0
        self.last = 0.0
        self._grew = asyncio.Event()

    def add(self, count: int) -> None:
        self.value += count
        self.last = time.monotonic()
        self._grew.set()

    async def reaches(self, target: int) -> None:
        """Wait until the count reaches target."""
        while self.value < target:
            self._grew.clear()
            await self._grew.wait()


class Acker:
    """The receiving end of one StreamingPull: passes what arrives to received (if given) and
    acks it on the stream every ACK_EVERY seconds, all ids received since the last ack in one
    request, as a client library would batch them."""

    def __init__(
        self,
        stream: Stream[v2_pb2.StreamingPullRequest, Any],
        received: Callable[[Sequence[v2_pb2.ReceivedMessage]], None] | None = None,
    ) -> None:
        self.stream = stream
        self.received = received
        self.pending: list[str] = []
        self.acked = Tally()

    async def read(self) -> None:
        """Until the server ends the stream."""
        while (response := await self.stream.recv_message()) is not None:
            if self.received is not None:
                self.received(response.messages)
            self.pending.extend(message.ack_id for message in response.messages)

    async def ack(self) -> None:
        """Forever."""
        while True:
            await asyncio.sleep(ACK_EVERY)
            if self.pending:
                ids, self.pending = self.pending, []
                await self.stream.send_message(v2_pb2.StreamingPullRequest(ack_ids=ids))
                self.acked.add(len(ids))


@contextlib.asynccontextmanager
async def streaming(
    port: int,
    queue: str,
    outstanding: int,
    received: Callable[[Sequence[v2_pb2.ReceivedMessage]], None] | None = None,
) -> AsyncIterator[Acker]:
    """A StreamingPull of queue on a connection of its own, its Acker reading and acking for the
    duration; then the stream is half-closed and the server's end awaited."""
    channel = Channel("127.0.0.1", port)
    first = v2_pb2.StreamingPullRequest(queue=queue, max_outstanding_messages=outstanding)
    try:
        async with v2_grpc.SubscriberStub(channel).StreamingPull.open() as stream:
            await stream.send_message(first)
            acker = Acker(stream, received)
            reader, acking = asyncio.ensure_future(acker.read()), asyncio.ensure_future(acker.ack())
            try:
                yield acker
                acking.cancel()
                await stream.end()
                await asyncio.wait_for(reader, 10)
            finally:
                acking.cancel()
                reader.cancel()
    finally:
        channel.close()


async def paced(
    rate: float, seconds: float, batch: int, send: Callable[[], Awaitable[Any]]
) -> float:
    """Start send() every batch/rate seconds for seconds, without waiting for earlier ones to
    finish; then wait for all. Returns the rate at which they were started (per message)."""
    interval, pending = batch / rate, set()
    started = time.perf_counter()
    count = int(seconds * rate / batch)
    for i in range(count):
        delay = started + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(send())
        pending.add(task)
        task.add_done_callback(pending.discard)
    took = time.perf_counter() - started
    await asyncio.gather(*pending)
    return count * batch / took


@contextlib.asynccontextmanager
async def acking(
    channel: aio_pika.abc.AbstractChannel, queue: str, prefetch: int
) -> AsyncIterator[Tally]:
    """aio-pika consuming queue on channel (prefetch as given) for the duration, acking each
    message as it comes; the Tally counts the acks."""
    await channel.set_qos(prefetch_count=prefetch)
    acked = Tally()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        acked.add(1)

    consumed = await channel.get_queue(queue)
    tag = await consumed.consume(on_message)
    try:
        yield acked
    finally:
        await consumed.cancel(tag)


async def delete_queue(url: str, name: str) -> None:
    """Remove a queue a measurement filled (its messages would slow the next one down)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Print rows of (what, figure, note) under title, aligned."""
    print(title)
    width = max(len(row[0]) for row in rows)
    for what, figure, note in rows:
        print(f"  {what:<{width}}  {figure:>16}  {note}".rstrip())


def write_json(path: Path | None, figures: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(figures, indent=1) + "\n")
        print(f"figures written to {path}")
