"""Throughput through the Python client (eventbus.client) beside aio-pika straight to RabbitMQ,
in one run.

Usage: .venv/bin/python bench/v2_client.py [--seconds 10] [--batches 100] [--pending 2000]
       [--json FILE] [--profile FILE]

client publish: a Publisher of client.publisher() with its defaults but max_messages (--batches,
default 100: max_latency 10 ms, 4 batches in flight) and one producer calling
publisher.publish(queue=..., data=100 bytes) as fast as it returns, keeping at most --pending
futures unanswered (awaiting the oldest when over). Messages/s from the first publish to the
last id received.
client publish + subscribe: the same, while client.subscribe(queue, handler,
max_outstanding_messages=1000) on a Client (a connection) of its own hands each message to a
handler that only counts it (returning: acked). Messages/s from the first publish to the last
handler return of everything published; then the subscription stops gracefully, every
published id must have been handled and a Pull that waits a second must find nothing left in
the queue: the table reports ids never handled, handled twice, or left.
Both run in this one process, on one plain asyncio event loop, as an application using the
client would.

Baselines, aio-pika measured before the daemon starts and after it stops, the mean of the two:
publish: persistent 100-byte messages to a durable queue with publisher confirms, 64 publishes
in flight (as bench/v2_publish.py); publish + subscribe: the same while a consumer on another
connection (prefetch 1000) acks each message as it comes (as bench/v2_stream.py).
Needs the local RabbitMQ, PostgreSQL and Redis; uses a vhost, a database and a Redis prefix of
its own, removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_direct import aio_pika_publish_rate
from bench.v2_common import (
    Tally,
    arguments,
    backends,
    body,
    daemon,
    delete_queue,
    table,
    write_json,
)
from bench.v2_stream import aio_pika_rate
from eventbus.client import Client, Message, OutboundMessage, Publisher

BATCHES = (100,)  # the publisher's max_messages
PENDING = 2000  # unanswered publish futures the producer keeps at most
OUTSTANDING = 1000  # the subscription's max_outstanding_messages, the baseline's prefetch
BASELINE_IN_FLIGHT = 64
DRAIN_TIMEOUT = 120.0  # seconds to wait for the last handler once publishing stopped
LEFTOVER_WAIT = 1.0  # seconds the Pull after the subscription stopped waits for a message
BODY = body()

T = TypeVar("T")


def run_plain(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run() on a plain asyncio loop, even should trio-asyncio be imported (it makes
    asyncio.run() start its own loop, on which aio-pika runs about a third as fast)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coroutine)


async def produce(publisher: Publisher, queue: str, seconds: float, pending: int) -> list[str]:
    """Publish BODY to queue as fast as publish() returns for seconds, with at most pending
    futures unanswered; returns the ids, once all came. Waits on the oldest future when over
    pending, then on the publisher's flush."""
    futures: deque[asyncio.Future[str]] = deque()
    ids: list[str] = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        futures.append(publisher.publish(queue=queue, data=BODY))
        if len(futures) > pending:
            ids.append(await futures.popleft())
    await publisher.flush()
    ids.extend(future.result() for future in futures)
    return ids


async def publish_rate(port: int, queue: str, batch: int, seconds: float, pending: int) -> float:
    """Messages/s of produce(), first publish to last id, after one message published alone
    to open the connection and make the queue."""
    async with Client(f"127.0.0.1:{port}") as client:
        await client.publish_batch([OutboundMessage(BODY, queue)])
        publisher = client.publisher(max_messages=batch)
        started = time.monotonic()
        ids = await produce(publisher, queue, seconds, pending)
        return len(ids) / (time.monotonic() - started)


class Handled:
    """The subscription's handler: counts each message by id, the distinct ones on a Tally."""

    def __init__(self) -> None:
        self.times: dict[str, int] = {}
        self.distinct = Tally()

    async def __call__(self, message: Message) -> None:
        seen = self.times.get(message.message_id, 0)
        self.times[message.message_id] = seen + 1
        if not seen:
            self.distinct.add(1)

    def missing(self, ids: list[str]) -> int:
        return len(set(ids) - self.times.keys())

    def duplicates(self) -> int:
        return sum(self.times.values()) - len(self.times)


@dataclass(frozen=True)
class Delivered:
    """What publish + subscribe measured: messages/s to the last handler of everything
    published, and what did not go as it should."""

    rate: float
    published: int
    missing: int  # published ids no handler saw
    duplicates: int  # handler calls beyond the first for an id
    leftover: int  # messages a Pull still found after the subscription stopped


async def stream_rate(port: int, queue: str, batch: int, seconds: float, pending: int) -> Delivered:
    """produce() while a subscription handles the queue; the clock starts once a first message
    published alone (which opens the connections and makes the queue) was handled."""
    handled, target = Handled(), f"127.0.0.1:{port}"
    async with Client(target) as subscriber, Client(target) as client:
        subscription = subscriber.subscribe(queue, handled, max_outstanding_messages=OUTSTANDING)
        [first] = await client.publish_batch([OutboundMessage(BODY, queue)])
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await handled.distinct.reaches(1)
        started = time.monotonic()
        ids = await produce(client.publisher(max_messages=batch), queue, seconds, pending)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await handled.distinct.reaches(len(ids) + 1)
        await subscription.stop()
        leftover = await client.pull(queue, max_messages=100, wait_seconds=LEFTOVER_WAIT)
    return Delivered(
        rate=(handled.distinct.value - 1) / (handled.distinct.last - started),
        published=len(ids),
        missing=handled.missing([first.message_id, *ids]),
        duplicates=handled.duplicates(),
        leftover=len(leftover),
    )


async def bus_rates(
    port: int, url: str, batch: int, seconds: float, pending: int
) -> tuple[float, Delivered]:
    """Both client figures for one max_messages, each on a queue of its own, deleted after."""
    queue = f"v2-client-publish-{batch}"
    published = await publish_rate(port, queue, batch, seconds, pending)
    await delete_queue(url, queue)
    queue = f"v2-client-stream-{batch}"
    delivered = await stream_rate(port, queue, batch, seconds, pending)
    await delete_queue(url, queue)
    return published, delivered


async def baselines(url: str, seconds: float) -> tuple[float, float]:
    """aio-pika: publish alone, then publish + consume."""
    published = await aio_pika_publish_rate(url, seconds, BASELINE_IN_FLIGHT)
    return published, await aio_pika_rate(url, seconds)


def main() -> None:
    args = arguments(__doc__, 10.0, BATCHES, pending=PENDING)
    pending = int(args.pending)
    with backends() as run:
        before = run_plain(baselines(run.url, args.seconds))
        with daemon(run, args.profile) as bus:
            figures = [
                run_plain(bus_rates(bus.port, run.url, b, args.seconds, pending))
                for b in args.batches
            ]
        after = run_plain(baselines(run.url, args.seconds))
    publish_runs, stream_runs = [before[0], after[0]], [before[1], after[1]]
    report(args.seconds, pending, publish_runs, stream_runs, args.batches, figures)
    publish_base, stream_base = statistics.mean(publish_runs), statistics.mean(stream_runs)
    write_json(
        args.json,
        {
            "benchmark": "client",
            "seconds": args.seconds,
            "pending": pending,
            "baseline": {
                "publish": {"runs": publish_runs, "rate": publish_base},
                "stream": {"runs": stream_runs, "rate": stream_base},
            },
            "bus": [
                {
                    "batch": b,
                    "publish": {"rate": p, "ratio": p / publish_base},
                    "stream": {**asdict(d), "ratio": d.rate / stream_base},
                }
                for b, (p, d) in zip(args.batches, figures, strict=True)
            ],
        },
    )


def report(
    seconds: float,
    pending: int,
    publish_runs: list[float],
    stream_runs: list[float],
    batches: tuple[int, ...],
    figures: list[tuple[float, Delivered]],
) -> None:
    publish_base, stream_base = statistics.mean(publish_runs), statistics.mean(stream_runs)
    rows = [baseline_row(f"publish, confirms, {BASELINE_IN_FLIGHT} in flight", publish_runs)]
    for batch, (published, _) in zip(batches, figures, strict=True):
        rows.append(
            (
                f"client publish, max_messages {batch}, {pending} pending",
                f"{published:,.0f} msgs/s",
                f"{published / publish_base:.2f} x baseline",
            )
        )
    what = f"publish ({BASELINE_IN_FLIGHT} in flight) + consume, acks"
    rows.append(baseline_row(what, stream_runs))
    for batch, (_, delivered) in zip(batches, figures, strict=True):
        rows.append(
            (
                f"client publish (max_messages {batch}) + subscribe, acks",
                f"{delivered.rate:,.0f} msgs/s",
                f"{delivered.rate / stream_base:.2f} x baseline{anomalies(delivered)}",
            )
        )
    title = f"v2 through the Python client, {seconds:g} s of publishing per figure, 100-byte"
    table(f"{title} persistent messages", rows)


def baseline_row(what: str, runs: list[float]) -> tuple[str, str, str]:
    return (
        f"aio-pika {what}",
        f"{statistics.mean(runs):,.0f} msgs/s",
        f"baseline (before {runs[0]:,.0f}, after {runs[1]:,.0f})",
    )


def anomalies(delivered: Delivered) -> str:
    """What went wrong delivering, for the table: '' when nothing did."""
    found = [
        f"{count} {what}"
        for count, what in (
            (delivered.missing, "never handled"),
            (delivered.duplicates, "handled twice"),
            (delivered.leftover, "left in the queue"),
        )
        if count
    ]
    return "; " + ", ".join(found) if found else ""


if __name__ == "__main__":
    main()
