"""Delayed-message dispatch with 1,000,000 rows pending in PostgreSQL, beside raw aio-pika
publish-with-confirms measured in the same run.

The rows, loaded with COPY: BACKLOG overdue ones (as after a node was down), the rest due in an
hour or more, and PROBES that fall due one by one while the backlog drains. One daemon runs the
delay job; the bench counts the backlog's queue until all of it is there, and consumes the
probes straight from RabbitMQ, noting when each arrives.
Prints: the backlog's dispatch rate, the probes' lateness percentiles, messages early (must be 0).

Usage: python bench/bench_delay.py [TOTAL] [BACKLOG] [PROBES]
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_direct import aio_pika_publish_rate, bench_backends, running_daemon  # noqa: E402

PROBE_START = 8.0  # seconds after loading ends
PROBE_SPREAD = 20.0


def rows(kind: str, count: int, due: datetime.datetime, step: float = 0.0) -> list[tuple]:
    """COPY records: (id, kind, target, body, due_at, ttl) with body = due epoch seconds."""
    out = []
    for i in range(count):
        at = due + datetime.timedelta(seconds=i * step)
        body = f"{at.timestamp():.6f}".encode()
        out.append((uuid.uuid4(), "queue", f"bench-{kind}", body, at, 0))
    return out


async def load(dsn: str, total: int, backlog: int, probes: int) -> float:
    """Load the rows; returns the epoch time the first probe falls due."""
    now = datetime.datetime.now(datetime.UTC)
    connection = await asyncpg.connect(dsn)
    columns = ["id", "kind", "target", "body", "due_at", "ttl_seconds"]
    try:
        far = total - backlog - probes
        for start in range(0, far, 100_000):
            chunk = rows("future", min(100_000, far - start), now + datetime.timedelta(hours=1))
            await connection.copy_records_to_table(
                "delayed_messages", records=chunk, columns=columns
            )
        await connection.copy_records_to_table(
            "delayed_messages",
            records=rows("backlog", backlog, now - datetime.timedelta(60)),
            columns=columns,
        )
        first_probe = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=PROBE_START)
        await connection.copy_records_to_table(
            "delayed_messages",
            records=rows("probe", probes, first_probe, PROBE_SPREAD / max(1, probes)),
            columns=columns,
        )
        await connection.execute("ANALYZE delayed_messages")
    finally:
        await connection.close()
    return first_probe.timestamp()


async def watch(
    url: str, backlog: int, probes: int, patience: float
) -> tuple[float | None, list[float]]:
    """When the whole backlog was in its queue (epoch seconds), and the lateness of each probe.

    The backlog queue is only counted, not consumed, while it fills: the raw publish rate it is
    compared with is measured without a consumer too. Probes are consumed as they arrive.
    """
    connection = await aio_pika.connect(url)
    lateness: list[float] = []

    async def on_probe(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        lateness.append(time.time() - float(message.body))
        await message.ack()

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2000)
    probe_queue = await channel.declare_queue("bench-probe", durable=True)
    await probe_queue.consume(on_probe)
    await channel.declare_queue("bench-backlog", durable=True)
    give_up = time.monotonic() + patience
    backlog_in_at: float | None = None
    while time.monotonic() < give_up and (backlog_in_at is None or len(lateness) < probes):
        if backlog_in_at is None:
            counted = await channel.declare_queue("bench-backlog", passive=True)
            if (counted.declaration_result.message_count or 0) >= backlog:
                backlog_in_at = time.time()
        await asyncio.sleep(0.05)
    await connection.close()
    return backlog_in_at, lateness


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main(total: int, backlog: int, probes: int) -> None:
    with bench_backends() as (url, dsn, prefix):
        raw_before = asyncio.run(aio_pika_publish_rate(url, 10, 64))
        subprocess.run(
            [sys.executable, "-m", "eventbus", "migrate", "--config", str(ROOT / "config.toml")],
            check=True,
            capture_output=True,
            env={**os.environ, "EVENTBUS_POSTGRES__DSN": dsn},
        )
        loading = time.monotonic()
        asyncio.run(load(dsn, total, backlog, probes))
        load_seconds = time.monotonic() - loading
        with running_daemon(url, dsn, prefix):
            started = time.time()
            backlog_in_at, lateness = asyncio.run(watch(url, backlog, probes, patience=300))
        raw_after = asyncio.run(aio_pika_publish_rate(url, 10, 64))
    drain = backlog_in_at - started if backlog_in_at is not None else float("nan")
    report(total, backlog, probes, (raw_before, raw_after), load_seconds, drain, lateness)


def report(
    total: int,
    backlog: int,
    probes: int,
    raws: tuple[float, float],
    load_seconds: float,
    drain: float,
    lateness: list[float],
) -> None:
    rate = backlog / drain  # nan when the backlog never arrived in full
    raw = sum(raws) / 2
    print(
        f"delayed dispatch: {total:,} rows pending ({backlog:,} overdue, {probes:,} probes "
        f"falling due over {PROBE_SPREAD:g} s), loaded by COPY in {load_seconds:.1f} s"
    )
    print(
        f"  aio-pika publish (confirms, persistent)   {raw:>8.0f} msgs/s  "
        f"mean of {raws[0]:.0f} before and {raws[1]:.0f} after the dispatch"
    )
    print(
        f"  backlog dispatched                        {rate:>8.0f} msgs/s  "
        f"{backlog:,} in {drain:.1f} s; {rate / raw:.2f} x aio-pika "
        "(goals >= 5000/s, >= 0.70 x)"
    )
    print(f"  probes delivered                          {len(lateness):>8}/{probes}")
    print(
        "  probe lateness (s) p50 {:.3f}  p95 {:.3f}  p99 {:.3f}  max {:.3f}".format(
            percentile(lateness, 0.5),
            percentile(lateness, 0.95),
            percentile(lateness, 0.99),
            max(lateness) if lateness else float("nan"),
        )
    )
    print(f"  probes early                              {sum(1 for x in lateness if x < 0):>8}")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:4]]
    main(*(arguments + [1_000_000, 100_000, 2_000][len(arguments) :]))
