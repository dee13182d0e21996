"""The two ways v2 hands out messages, draining the same pre-filled queue, beside aio-pika, in one
run: StreamingPull's held AMQP deliveries against Pull + Acknowledge's recorded ones.

Usage: .venv/bin/python bench/v2_modes.py [--messages 20000] [--pullers 8] [--json FILE]
       [--profile FILE]

Each figure fills a queue of its own with --messages persistent 100-byte messages, then times
draining it: messages per second from the first request for messages to the last ack.
aio-pika (the baseline): filled with publisher confirms (64 publishes in flight); one consumer
(prefetch 1000) acks each message as it comes. Measured before the daemon starts and after it
stops, the mean of the two is the baseline.
hold: filled by eventbus.v2.Publisher/Publish (batches of 100, 8 calls in flight over 4
connections); one eventbus.v2.Subscriber/StreamingPull (max_outstanding_messages 1000) takes it
all, its ids acked on the stream every 5 ms. The daemon holds each message as an unacked AMQP
delivery on the stream's channel; an ack is an AMQP ack, nothing is written per message.
record: filled alike; --pullers loops (over 4 connections) each call Pull (max_messages 100,
wait_seconds 0.5), then Acknowledge with the ids it got, again and again. Every message handed
out is recorded (the internal confirm queue, then PostgreSQL), every ack too (the internal ack
queue, then PostgreSQL).
Beside each rate, how many messages a stream response or a Pull brought, on average.
For hold and record also the daemon's CPU time (utime + stime in /proc) per message: up to the
last ack, and what it spends after that (the bookkeeping catching up), less its idle rate
measured just before the drain; and the rows PostgreSQL inserted, updated and deleted in the
run's database per message (pg_stat_database), from before the drain until the inserts and
deletes stood still for 11 s after it (an idle backend reports its counts within 10 s). The
deletes are the cleanup's, which runs every 30 s: counted when it ran within that time. The
daemon updates a row a second or so when idle, in both modes.
What it shows: what recording each hand-out and each ack costs, in throughput, CPU and rows,
the reason StreamingPull holds its deliveries in RabbitMQ instead.
(--seconds and --batches, common to the v2 benchmarks, are not used here.)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
from grpclib.client import Channel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.v2_common import (
    CONNECTIONS,
    Backends,
    Bus,
    Tally,
    acking,
    arguments,
    backends,
    body,
    daemon,
    delete_queue,
    outbound,
    streaming,
    table,
    write_json,
)
from eventbus._generated import v2_grpc, v2_pb2

MESSAGES = 20_000
PULLERS = 8
FILL_BATCH = 100  # messages per Publish call
FILL_IN_FLIGHT = 8
BASELINE_IN_FLIGHT = 64
OUTSTANDING = 1000  # the stream's max_outstanding_messages, the baseline consumer's prefetch
PULL_MOST = 100  # Pull's max_messages
PULL_WAIT = 0.5  # Pull's wait_seconds
DRAIN_TIMEOUT = 300.0
STILL = 11.0  # seconds PostgreSQL's counts must stand still (idle backends report within 10)
STILL_POLL = 0.5
STILL_TIMEOUT = 180.0
TICKS = os.sysconf("SC_CLK_TCK")
ROWS = """
SELECT tup_inserted, tup_updated, tup_deleted FROM pg_stat_database
WHERE datname = current_database()
"""


@dataclass(frozen=True)
class Rows:
    """Rows PostgreSQL counts as inserted, updated and deleted in a database."""

    inserted: int
    updated: int
    deleted: int

    def __sub__(self, other: Rows) -> Rows:
        return Rows(
            self.inserted - other.inserted,
            self.updated - other.updated,
            self.deleted - other.deleted,
        )


@dataclass(frozen=True)
class Mark:
    """The daemon's CPU seconds so far, at a time.monotonic()."""

    at: float
    cpu: float

    @classmethod
    def of(cls, pid: int) -> Mark:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return cls(time.monotonic(), (int(fields[11]) + int(fields[12])) / TICKS)  # utime, stime


@dataclass(frozen=True)
class Still:
    """PostgreSQL's counts once they stood still, the daemon's CPU seconds a second meanwhile,
    and when they were read."""

    rows: Rows
    idle: float
    end: Mark


@dataclass
class Drain:
    """A drain's rate (messages/s, first request to last ack), how many answers brought its
    messages (stream responses, Pulls), and what should not happen: messages that came again,
    ack ids the daemon did not know."""

    rate: float = 0.0
    answers: int = 0
    redelivered: int = 0
    invalid: int = 0


async def still(dsn: str, pid: int) -> Still:
    """Waits until the run's database inserted and deleted nothing for STILL seconds."""
    connection = await asyncpg.connect(dsn)
    try:
        async with asyncio.timeout(STILL_TIMEOUT):
            last, since = await rows(connection), Mark.of(pid)
            while time.monotonic() - since.at < STILL:
                await asyncio.sleep(STILL_POLL)
                now = await rows(connection)
                if (now.inserted, now.deleted) != (last.inserted, last.deleted):
                    since = Mark.of(pid)
                last = now
    finally:
        await connection.close()
    end = Mark.of(pid)
    return Still(last, (end.cpu - since.cpu) / (end.at - since.at), end)


async def rows(connection: asyncpg.Connection) -> Rows:
    return Rows(*await connection.fetchrow(ROWS))


async def fill(port: int, queue: str, count: int) -> None:
    """count messages into queue: Publish calls of FILL_BATCH (the last maybe fewer),
    FILL_IN_FLIGHT at a time; returns once all are stored."""
    channels = [Channel("127.0.0.1", port) for _ in range(CONNECTIONS)]
    stubs = [v2_grpc.PublisherStub(channel) for channel in channels]
    sizes = [min(FILL_BATCH, count - start) for start in range(0, count, FILL_BATCH)]

    async def caller(stub: v2_grpc.PublisherStub) -> None:
        while sizes:
            size = sizes.pop()
            reply = await stub.Publish(outbound(queue, size))
            if len(reply.results) != size:
                raise RuntimeError("Publish answered with fewer results than messages")

    try:
        await asyncio.gather(*(caller(stubs[i % CONNECTIONS]) for i in range(FILL_IN_FLIGHT)))
    finally:
        for channel in channels:
            channel.close()


async def hold(port: int, queue: str, count: int) -> Drain:
    """Drains queue through one StreamingPull, acks on the stream."""
    drain = Drain()

    def received(messages: Sequence[v2_pb2.ReceivedMessage]) -> None:
        drain.answers += bool(messages)
        drain.redelivered += sum(message.attempt > 1 for message in messages)

    started = time.monotonic()
    async with streaming(port, queue, OUTSTANDING, received) as acker:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await acker.acked.reaches(count)
    drain.rate = count / (acker.acked.last - started)
    return drain


async def record(port: int, queue: str, count: int, pullers: int) -> Drain:
    """Drains queue through pullers loops of Pull then Acknowledge."""
    channels = [Channel("127.0.0.1", port) for _ in range(CONNECTIONS)]
    stubs = [v2_grpc.SubscriberStub(channel) for channel in channels]
    drain, acked = Drain(), Tally()
    pull = v2_pb2.PullRequest(queue=queue, max_messages=PULL_MOST, wait_seconds=PULL_WAIT)

    async def puller(stub: v2_grpc.SubscriberStub) -> None:
        while acked.value < count:
            messages = (await stub.Pull(pull)).messages
            if not messages:
                continue
            ids = [message.ack_id for message in messages]
            answer = await stub.Acknowledge(v2_pb2.AcknowledgeRequest(ack_ids=ids))
            drain.answers += 1
            drain.redelivered += sum(message.attempt > 1 for message in messages)
            drain.invalid += len(answer.invalid_ack_ids)
            acked.add(len(ids) - len(answer.invalid_ack_ids))

    started = time.monotonic()
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await asyncio.gather(*(puller(stubs[i % CONNECTIONS]) for i in range(pullers)))
    finally:
        for channel in channels:
            channel.close()
    drain.rate = count / (acked.last - started)
    return drain


async def measured(
    bus: Bus, run: Backends, queue: str, count: int, drain: Callable[[], Awaitable[Drain]]
) -> dict[str, Any]:
    """Fills queue, drains it with drain(), then removes it: the drain's figures."""
    await fill(bus.port, queue, count)
    before = await still(run.dsn, bus.pid)
    start = Mark.of(bus.pid)
    drained = await drain()
    done = Mark.of(bus.pid)
    after = await still(run.dsn, bus.pid)
    await delete_queue(run.url, queue)
    tail = after.end.cpu - done.cpu - before.idle * (after.end.at - done.at)
    written = after.rows - before.rows
    return asdict(drained) | {
        "cpu_us": (done.cpu - start.cpu) / count * 1e6,
        "cpu_after_us": tail / count * 1e6,
        "idle_cpu_percent": before.idle * 100,
        "rows": asdict(written),
        "rows_per_message": {key: n / count for key, n in asdict(written).items()},
    }


async def bus_figures(bus: Bus, run: Backends, count: int, pullers: int) -> dict[str, Any]:
    return {
        "hold": await measured(
            bus, run, "v2-modes-hold", count, lambda: hold(bus.port, "v2-modes-hold", count)
        ),
        "record": await measured(
            bus,
            run,
            "v2-modes-record",
            count,
            lambda: record(bus.port, "v2-modes-record", count, pullers),
        ),
    }


async def aio_pika_rate(url: str, count: int) -> float:
    """Messages/s of aio-pika consuming count messages filled beforehand, first to last ack."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("bench-raw-modes", durable=True)
        await aio_pika_fill(channel, queue.name, count)
        started = time.monotonic()
        async with acking(await connection.channel(), queue.name, OUTSTANDING) as acked:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await acked.reaches(count)
        await queue.delete(if_unused=False, if_empty=False)
    return count / (acked.last - started)


async def aio_pika_fill(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    """count persistent messages into queue, BASELINE_IN_FLIGHT publishes at a time, each
    confirmed."""
    left = [count]

    async def publisher() -> None:
        while left[0] > 0:
            left[0] -= 1
            message = aio_pika.Message(body(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue)

    await asyncio.gather(*(publisher() for _ in range(BASELINE_IN_FLIGHT)))


def main() -> None:
    args = arguments(__doc__, 0.0, (FILL_BATCH,), messages=MESSAGES, pullers=PULLERS)
    count, pullers = int(args.messages), int(args.pullers)
    with backends() as run:
        before = asyncio.run(aio_pika_rate(run.url, count))
        with daemon(run, args.profile) as bus:
            figures = asyncio.run(bus_figures(bus, run, count, pullers))
        after = asyncio.run(aio_pika_rate(run.url, count))
    baseline = {"runs": [before, after], "rate": statistics.mean([before, after])}
    report(count, pullers, baseline, figures)
    write_json(
        args.json,
        {
            "benchmark": "modes",
            "messages": count,
            "pullers": pullers,
            "baseline": baseline,
            **{
                mode: mode_figures | {"ratio": mode_figures["rate"] / baseline["rate"]}
                for mode, mode_figures in figures.items()
            },
        },
    )


def report(
    count: int, pullers: int, baseline: dict[str, Any], figures: dict[str, dict[str, Any]]
) -> None:
    before, after = baseline["runs"]
    names = {
        "hold": f"hold: StreamingPull ({OUTSTANDING} outstanding), acks on the stream",
        "record": f"record: {pullers} x (Pull of {PULL_MOST}, then Acknowledge)",
    }
    lines = [
        (
            f"aio-pika consume (prefetch {OUTSTANDING}), acks",
            f"{baseline['rate']:,.0f} msgs/s",
            f"baseline (before {before:,.0f}, after {after:,.0f})",
        )
    ]
    for mode, name in names.items():
        rate, each = figures[mode]["rate"], count / figures[mode]["answers"]
        note = f"{rate / baseline['rate']:.2f} x baseline; {each:,.1f} messages per answer"
        lines.append((name, f"{rate:,.0f} msgs/s", note))
    for mode in names:
        lines.extend(details(mode, figures[mode]))
    title = f"v2 hand-out modes, draining {count:,} queued messages, first request to last ack"
    table(title, lines)


def details(mode: str, figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """A mode's CPU and PostgreSQL figures, and what went wrong if anything did."""
    per = figures["rows_per_message"]
    lines = [
        (
            f"{mode}: daemon CPU per message",
            f"{figures['cpu_us']:,.1f} us",
            f"to the last ack; after it {figures['cpu_after_us']:+,.1f} us "
            f"(idle {figures['idle_cpu_percent']:.1f} % CPU taken off)",
        ),
        (
            f"{mode}: PostgreSQL rows per message",
            f"{per['inserted']:.2f} inserted",
            f"{per['updated']:.2f} updated, {per['deleted']:.2f} deleted",
        ),
    ]
    if figures["redelivered"] or figures["invalid"]:
        lines.append(
            (
                f"{mode}: not as expected",
                f"{figures['redelivered']} again",
                f"messages delivered again; {figures['invalid']} ack ids refused",
            )
        )
    return lines


if __name__ == "__main__":
    main()
