"""v2 Publish throughput beside aio-pika publishing straight to RabbitMQ, in one run.

Usage: .venv/bin/python bench/v2_publish.py [--seconds 10] [--batches 1,10,100] [--json FILE]
       [--profile FILE]

aio-pika (the baseline): persistent 100-byte messages to a durable queue with publisher confirms,
one message per publish, 64 publishes in flight; measured before the daemon starts and after it
stops, the mean of the two is the baseline.
bus: eventbus.v2.Publisher/Publish with batches of 1, 10 and 100 such messages, 8 calls in
flight (grpclib, over 4 connections), each call answered once RabbitMQ confirmed its batch.
Prints messages/s and each batch size's ratio to the baseline; goal (SPEC section 9): batches
of 100 >= 1.5x. Needs the local RabbitMQ, PostgreSQL and Redis; uses a vhost, a database and a
Redis prefix of its own, removed afterwards.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_direct import aio_pika_publish_rate
from bench.v2_common import (
    Bus,
    arguments,
    backends,
    cpu_seconds,
    daemon,
    delete_queue,
    publish_batches,
    table,
    write_json,
)

BATCHES = (1, 10, 100)
GOAL_BATCH = 100
IN_FLIGHT = 8
BASELINE_IN_FLIGHT = 64
GOAL = 1.5  # x the baseline, batches of 100


async def publish_rate(bus: Bus, queue: str, batch: int, seconds: float) -> tuple[float, float]:
    """Messages/s stored by IN_FLIGHT callers publishing batches to queue for seconds, after
    half a second of the same to open the connections and declare the queue; and the daemon's
    CPU time per message meanwhile (seconds)."""
    await publish_batches(bus.port, queue, batch, 0.5, IN_FLIGHT)
    cpu = cpu_seconds(bus.pid)
    published, elapsed = await publish_batches(bus.port, queue, batch, seconds, IN_FLIGHT)
    return published / elapsed, (cpu_seconds(bus.pid) - cpu) / published


async def bus_rate(bus: Bus, url: str, batch: int, seconds: float) -> tuple[float, float]:
    queue = f"v2-publish-{batch}"
    figures = await publish_rate(bus, queue, batch, seconds)
    await delete_queue(url, queue)
    return figures


def main() -> None:
    args = arguments(__doc__, 10.0, BATCHES)
    with backends() as run:
        before = asyncio.run(aio_pika_publish_rate(run.url, args.seconds, BASELINE_IN_FLIGHT))
        with daemon(run, args.profile) as bus:
            figures = [asyncio.run(bus_rate(bus, run.url, b, args.seconds)) for b in args.batches]
        after = asyncio.run(aio_pika_publish_rate(run.url, args.seconds, BASELINE_IN_FLIGHT))
    baseline = statistics.mean([before, after])
    report(args.seconds, [before, after], args.batches, figures)
    write_json(
        args.json,
        {
            "benchmark": "publish",
            "seconds": args.seconds,
            "baseline": {"runs": [before, after], "rate": baseline},
            "bus": [
                {"batch": b, "rate": r, "ratio": r / baseline, "daemon_cpu_per_message": c}
                for b, (r, c) in zip(args.batches, figures, strict=True)
            ],
            "goal": {"batch": GOAL_BATCH, "ratio": GOAL},
        },
    )


def report(
    seconds: float,
    baselines: list[float],
    batches: tuple[int, ...],
    figures: list[tuple[float, float]],
) -> None:
    baseline = statistics.mean(baselines)
    rows = [
        (
            f"aio-pika publish, confirms, {BASELINE_IN_FLIGHT} in flight",
            f"{baseline:,.0f} msgs/s",
            f"baseline (before {baselines[0]:,.0f}, after {baselines[1]:,.0f})",
        )
    ]
    for batch, (rate, cpu) in zip(batches, figures, strict=True):
        goal = f" (goal >= {GOAL})" if batch == GOAL_BATCH else ""
        rows.append(
            (
                f"bus Publish, batches of {batch}, {IN_FLIGHT} calls in flight",
                f"{rate:,.0f} msgs/s",
                f"{rate / baseline:.2f} x baseline{goal}; daemon CPU {cpu * 1e6:,.0f} us/message",
            )
        )
    table(f"v2 Publish, {seconds:g} s per figure, 100-byte persistent messages", rows)


if __name__ == "__main__":
    main()
