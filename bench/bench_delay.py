"""Delayed-message dispatch with 1,000,000 rows pending in PostgreSQL, beside raw aio-pika
publish-with-confirms measured in the same run.

The rows, loaded with COPY: BACKLOG overdue ones (as after a node was down), the rest due in an
hour or more, and PROBES that fall due one by one while the backlog drains. One daemon runs the
delay job; a consumer straight on RabbitMQ notes when each message arrives.
Prints: the backlog's dispatch rate, the probes' lateness percentiles, messages early (must be 0).

Usage: python bench/bench_delay.py [TOTAL] [BACKLOG] [PROBES]
"""

from __future__ import annotations

import asyncio
import contextlib
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

from bench.bench_direct import aio_pika_rates, bench_backends, running_daemon  # noqa: E402

PROBE_START = 8.0  # seconds after loading ends
PROBE_SPREAD = 20.0


def rows(kind: str, count: int, due: datetime.datetime, step: float = 0.0) -> list[tuple]:
    """COPY records: (id, kind, target, body, due_at, ttl) with body = due epoch seconds."""
    out = []
    for i in range(count):
        at = due + datetime.timedelta(seconds=i * step)
        out.append((uuid.uuid4(), "queue", f"bench-{kind}", f"{at.timestamp():.6f}", at, 0))
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


async def watch(url: str, backlog: int, probes: int, patience: float) -> dict[str, list[float]]:
    """Arrival times of backlog messages and lateness of probes, consumed straight from
    RabbitMQ."""
    connection = await aio_pika.connect(url)
    seen: dict[str, list[float]] = {"backlog": [], "probe": []}
    done = asyncio.Event()

    def consumer(kind: str, wanted: int):  # type: ignore[no-untyped-def]
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived = time.time()
            await message.ack()
            due = float(message.body)
            seen[kind].append(arrived if kind == "backlog" else arrived - due)
            if len(seen["backlog"]) >= backlog and len(seen["probe"]) >= probes:
                done.set()

        return on_message

    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2000)
    for kind, wanted in (("backlog", backlog), ("probe", probes)):
        queue = await channel.declare_queue(f"bench-{kind}", durable=True)
        await queue.consume(consumer(kind, wanted))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), patience)
    await connection.close()
    return seen


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main(total: int, backlog: int, probes: int) -> None:
    with bench_backends() as (url, dsn, prefix):
        raw = asyncio.run(aio_pika_rates(url, 10, 64))["publish"]
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
            seen = asyncio.run(watch(url, backlog, probes, patience=300))
    report(total, backlog, probes, raw, load_seconds, started, seen)


def report(
    total: int,
    backlog: int,
    probes: int,
    raw: float,
    load_seconds: float,
    started: float,
    seen: dict[str, list[float]],
) -> None:
    arrivals, lateness = seen["backlog"], seen["probe"]
    drain = (max(arrivals) - started) if arrivals else float("nan")
    rate = len(arrivals) / drain if arrivals else 0.0
    print(
        f"delayed dispatch: {total:,} rows pending ({backlog:,} overdue, {probes:,} probes "
        f"falling due over {PROBE_SPREAD:g} s), loaded by COPY in {load_seconds:.1f} s"
    )
    print(f"  aio-pika publish (confirms, persistent)   {raw:>8.0f} msgs/s")
    print(
        f"  backlog dispatched                        {rate:>8.0f} msgs/s  "
        f"{len(arrivals):,}/{backlog:,} in {drain:.1f} s; {rate / raw:.2f} x aio-pika "
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
