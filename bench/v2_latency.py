"""Latency from publish to receipt at a steady rate: v2 Publish -> StreamingPull beside aio-pika's
publish -> consumer callback, in one run.

Usage: .venv/bin/python bench/v2_latency.py [--seconds 15] [--rate 1000] [--batches 1,10]
       [--json FILE] [--profile FILE]

Every message (100 bytes) carries in its body a time.perf_counter() stamp; the receiving side,
in the same process, takes the difference on receipt. Publishes start on a fixed schedule, RATE
messages a second, whether or not earlier ones were answered; the first second's messages are
left out of the figures (connections warming up).
aio-pika (the baseline): one persistent message per publish (publisher confirms), stamped as the
publish starts, on one connection; a consumer with prefetch 1000 on another, its callback is
the receipt (then it acks). Measured before the daemon starts and after it stops, both runs'
latencies pooled.
bus: one StreamingPull (max_outstanding_messages 1000, acks on the stream every 5 ms; a
response's arrival at the client is the receipt of every message in it), fed by
eventbus.v2.Publisher/Publish calls of one message every 1/RATE s, stamped as the call starts;
and of batches of 10 every 10/RATE s, each message stamped as a batching client would have
queued it (1/RATE s apart, the last as the call starts), so its wait in the batch counts.
Prints p50, p90, p99 and the largest, and says when the receiving side fell behind the rate;
goal (SPEC section 9): the bus's p99 <= 3x aio-pika's.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
from grpclib.client import Channel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.v2_common import (
    Tally,
    arguments,
    backends,
    body,
    daemon,
    delete_queue,
    outbound,
    paced,
    percentile,
    sent_at,
    stamped,
    streaming,
    table,
    write_json,
)
from eventbus._generated import v2_grpc, v2_pb2

RATE = 1000.0  # messages a second
BATCHES = (1, 10)
WARM_UP = 1.0  # seconds of the start left out
OUTSTANDING = 1000
DRAIN_TIMEOUT = 60.0
GOAL = 3.0  # the bus's p99 at most this many times aio-pika's
QUANTILES = 1000  # points of the distribution written to JSON


class Receipts:
    """Latencies (seconds) of the messages received, those sent before `counted_from` left out."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counted_from = time.perf_counter() + WARM_UP
        self.latencies: list[float] = []
        self.received = Tally()

    def record(self, bodies: Iterable[bytes]) -> None:
        now, count = time.perf_counter(), 0
        for data in bodies:
            sent = sent_at(data)
            if sent >= self.counted_from:
                self.latencies.append(now - sent)
            count += 1
        self.received.add(count)


async def bus_latencies(
    port: int, queue: str, batch: int, seconds: float, rate: float
) -> dict[str, Any]:
    receipts: Receipts | None = None

    def received(messages: Sequence[v2_pb2.ReceivedMessage]) -> None:
        if receipts is not None:
            receipts.record(message.data for message in messages)

    channel = Channel("127.0.0.1", port)
    publisher = v2_grpc.PublisherStub(channel)
    try:
        async with streaming(port, queue, OUTSTANDING, received) as acker:
            await publisher.Publish(outbound(queue, 1))  # the queue, the stream's first message
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await acker.acked.reaches(1)
            receipts = Receipts()
            achieved = await paced(
                rate, seconds, batch, lambda: publisher.Publish(stamped(queue, batch, 1 / rate))
            )
            await drained(receipts, int(seconds * rate / batch) * batch)
    finally:
        channel.close()
    return summary(receipts.latencies, achieved) | {"behind": behind(receipts, seconds)}


def behind(receipts: Receipts, seconds: float) -> float:
    """Seconds from the end of the publishing schedule to the last receipt: more than a few
    milliseconds means the receiving side could not keep up with the rate."""
    return receipts.received.last - receipts.started - seconds


async def drained(receipts: Receipts, count: int) -> None:
    async with asyncio.timeout(DRAIN_TIMEOUT):
        await receipts.received.reaches(count)


async def bus_figures(
    port: int, url: str, batch: int, seconds: float, rate: float
) -> dict[str, Any]:
    queue = f"v2-latency-{batch}"
    figures = await bus_latencies(port, queue, batch, seconds, rate)
    await delete_queue(url, queue)
    return {"batch": batch, **figures}


async def aio_pika_latencies(url: str, seconds: float, rate: float) -> tuple[list[float], float]:
    """Each message's latency (seconds), and how far behind the schedule the last one came."""
    publishing, consuming = await aio_pika.connect(url), await aio_pika.connect(url)
    async with publishing, consuming:
        channel = await publishing.channel(publisher_confirms=True)
        queue = await channel.declare_queue("bench-raw-latency", durable=True)
        consumer = await consuming.channel()
        await consumer.set_qos(prefetch_count=OUTSTANDING)
        receipts = Receipts()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            receipts.record([message.body])
            await message.ack()

        consumed = await consumer.get_queue(queue.name)
        tag = await consumed.consume(on_message)
        await paced(rate, seconds, 1, lambda: publish_one(channel, queue.name))
        await drained(receipts, int(seconds * rate))
        await consumed.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return receipts.latencies, behind(receipts, seconds)


async def publish_one(channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    message = aio_pika.Message(
        body(time.perf_counter()), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await channel.default_exchange.publish(message, routing_key=queue)


def summary(latencies: list[float], achieved: float | None = None) -> dict[str, Any]:
    """Percentiles in milliseconds, and QUANTILES + 1 points of the distribution."""
    ordered = sorted(latencies)
    points = [1000 * percentile(ordered, i / QUANTILES) for i in range(QUANTILES + 1)]
    figures: dict[str, Any] = {f"p{p}": 1000 * percentile(ordered, p / 100) for p in (50, 90, 99)}
    figures |= {"max": 1000 * ordered[-1], "count": len(ordered), "quantiles_ms": points}
    if achieved is not None:
        figures["rate"] = achieved
    return figures


def main() -> None:
    args = arguments(__doc__, 15.0, BATCHES, rate=RATE)
    with backends() as run:
        before = asyncio.run(aio_pika_latencies(run.url, args.seconds, args.rate))
        with daemon(run, args.profile) as bus:
            rows = [
                asyncio.run(bus_figures(bus.port, run.url, b, args.seconds, args.rate))
                for b in args.batches
            ]
        after = asyncio.run(aio_pika_latencies(run.url, args.seconds, args.rate))
    baseline = pooled([before, after])
    report(args.seconds, args.rate, baseline, rows)
    figures = {"benchmark": "latency", "seconds": args.seconds, "rate": args.rate}
    figures |= {"baseline": baseline, "bus": rows, "goal": {"p99_ratio": GOAL}}
    write_json(args.json, figures)


def pooled(runs: list[tuple[list[float], float]]) -> dict[str, Any]:
    """The baseline's figures over both runs' latencies, and each run's own."""
    figures = summary([latency for latencies, _ in runs for latency in latencies])
    figures["behind"] = max(late for _, late in runs)
    figures["runs"] = [
        {k: v for k, v in summary(latencies).items() if k != "quantiles_ms"} | {"behind": late}
        for latencies, late in runs
    ]
    return figures


def percentiles(figures: dict[str, Any]) -> str:
    return (
        f"p50 {figures['p50']:6.2f}  p90 {figures['p90']:6.2f}  p99 {figures['p99']:6.2f}  "
        f"max {figures['max']:7.2f} ms"
    )


def kept_up(figures: dict[str, Any]) -> str:
    late = figures["behind"]
    return "" if late < 0.5 else f"; did not keep up (last receipt {late:.1f} s late)"


def report(
    seconds: float, rate: float, baseline: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    before, after = (f"{run['p99']:.2f}" for run in baseline["runs"])
    lines = [
        (
            "aio-pika publish -> consumer callback",
            percentiles(baseline),
            f"baseline (p99 before {before} ms, after {after} ms){kept_up(baseline)}",
        )
    ]
    for row in rows:
        ratio = row["p99"] / baseline["p99"]
        verdict = "met" if ratio <= GOAL else "missed"
        lines.append(
            (
                f"bus Publish (batches of {row['batch']}) -> StreamingPull",
                percentiles(row),
                f"p99 {ratio:.2f} x baseline (goal <= {GOAL:g}: {verdict}); "
                f"sent at {row['rate']:,.0f} msgs/s{kept_up(row)}",
            )
        )
    table(f"latency publish -> receipt at {rate:,.0f} msgs/s, {seconds:g} s each", lines)


if __name__ == "__main__":
    main()
