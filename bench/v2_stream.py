"""End-to-end v2 throughput (Publish + StreamingPull + acks on the stream) beside aio-pika publish +
consume with acks, in one run.

Usage: .venv/bin/python bench/v2_stream.py [--seconds 10] [--batches 1,10,100] [--json FILE]
       [--profile FILE]

aio-pika (the baseline): 64 publishes in flight (persistent 100-byte messages, durable queue,
publisher confirms, one message per publish) on one connection, while a consumer on another
connection (prefetch 1000) acks each message as it comes; measured before the daemon starts and
after it stops, the mean of the two is the baseline.
bus: 8 eventbus.v2.Publisher/Publish calls in flight (batches of 1, 10 or 100, over 4
connections) while one eventbus.v2.Subscriber/StreamingPull stream on a connection of its own
(max_outstanding_messages 1000) receives them; the ids received are acked on the stream every
5 ms, as a client library would batch them.
Each figure publishes for --seconds, then waits until every message published is acked: messages
per second from the first publish to the last ack. Goal (SPEC section 9): batches of 100 >= 1.0x.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_direct import publish_for
from bench.v2_common import (
    acking,
    arguments,
    backends,
    daemon,
    delete_queue,
    publish_batches,
    streaming,
    table,
    write_json,
)

BATCHES = (1, 10, 100)
GOAL_BATCH = 100
IN_FLIGHT = 8
BASELINE_IN_FLIGHT = 64
OUTSTANDING = 1000  # the stream's max_outstanding_messages, the baseline consumer's prefetch
DRAIN_TIMEOUT = 120.0  # seconds to wait for the last ack once publishing stopped
GOAL = 1.0  # x the baseline, batches of 100


async def stream_rate(port: int, queue: str, batch: int, seconds: float) -> float:
    """Messages/s from the first publish to the last ack of everything published."""
    async with streaming(port, queue, OUTSTANDING) as acker:
        started = time.monotonic()
        published, _ = await publish_batches(port, queue, batch, seconds, IN_FLIGHT)
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await acker.acked.reaches(published)
    return published / (acker.acked.last - started)


async def bus_rate(port: int, url: str, batch: int, seconds: float) -> float:
    queue = f"v2-stream-{batch}"
    rate = await stream_rate(port, queue, batch, seconds)
    await delete_queue(url, queue)
    return rate


async def aio_pika_rate(url: str, seconds: float) -> float:
    """Messages/s of aio-pika publishing and consuming at once, first publish to last ack."""
    publishing, consuming = await aio_pika.connect(url), await aio_pika.connect(url)
    async with publishing, consuming:
        channel = await publishing.channel(publisher_confirms=True)
        queue = await channel.declare_queue("bench-raw-stream", durable=True)
        started = time.monotonic()
        async with acking(await consuming.channel(), queue.name, OUTSTANDING) as acked:
            published, _ = await publish_for(channel, queue.name, seconds, BASELINE_IN_FLIGHT)
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await acked.reaches(published)
        await queue.delete(if_unused=False, if_empty=False)
    return published / (acked.last - started)


def main() -> None:
    args = arguments(__doc__, 10.0, BATCHES)
    with backends() as run:
        before = asyncio.run(aio_pika_rate(run.url, args.seconds))
        with daemon(run, args.profile) as bus:
            rates = [
                asyncio.run(bus_rate(bus.port, run.url, b, args.seconds)) for b in args.batches
            ]
        after = asyncio.run(aio_pika_rate(run.url, args.seconds))
    baseline = statistics.mean([before, after])
    report(args.seconds, [before, after], args.batches, rates)
    write_json(
        args.json,
        {
            "benchmark": "stream",
            "seconds": args.seconds,
            "baseline": {"runs": [before, after], "rate": baseline},
            "bus": [
                {"batch": b, "rate": r, "ratio": r / baseline}
                for b, r in zip(args.batches, rates, strict=True)
            ],
            "goal": {"batch": GOAL_BATCH, "ratio": GOAL},
        },
    )


def report(
    seconds: float, baselines: list[float], batches: tuple[int, ...], rates: list[float]
) -> None:
    baseline = statistics.mean(baselines)
    rows = [
        (
            f"aio-pika publish ({BASELINE_IN_FLIGHT} in flight) + consume, acks",
            f"{baseline:,.0f} msgs/s",
            f"baseline (before {baselines[0]:,.0f}, after {baselines[1]:,.0f})",
        )
    ]
    for batch, rate in zip(batches, rates, strict=True):
        goal = f" (goal >= {GOAL})" if batch == GOAL_BATCH else ""
        rows.append(
            (
                f"bus Publish (batches of {batch}) + StreamingPull, acks",
                f"{rate:,.0f} msgs/s",
                f"{rate / baseline:.2f} x baseline{goal}",
            )
        )
    title = f"v2 publish + stream + ack, {seconds:g} s of publishing per figure, first to last ack"
    table(title, rows)


if __name__ == "__main__":
    main()
