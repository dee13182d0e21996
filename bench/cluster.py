"""The bus on a real cluster (scripts/cluster.py: three RabbitMQ nodes, a PostgreSQL primary and
standby, daemons with amqp.urls over the three nodes): classic beside quorum queues in one run,
aio-pika straight to the same cluster as the baseline, and how long a broker failover takes.

Usage: .venv/bin/python bench/cluster.py [--seconds 8] [--daemons 2] [--types classic,quorum]
       [--json FILE]

For each queue type a cluster is started whose daemons declare that type (amqp.queue_type), and
on it, in order:
  aio-pika publish: persistent 100-byte messages with confirms, 64 in flight, to a durable queue
    of that type (x-queue-type) on the first node;
  aio-pika publish + consume: the same while a consumer (prefetch 1000) acks them, first publish
    to last ack;
  bus publish: eventbus.v2.Publisher/Publish, batches of 100, 8 calls in flight (grpclib, over 4
    connections) to the first daemon; v1 mq.Mq/publish, one message a call, 64 in flight;
  bus publish + consume: Publish batches of 100 while a StreamingPull (1000 outstanding) acks on
    the stream, first publish to last ack;
  failover: each daemon's own v1 publisher publishes one message after another (2 s deadline);
    the RabbitMQ node the daemons are connected to is SIGKILLed; the figure is the time from the
    kill to the first publish sent after it and answered OK (through another node), per daemon.
    The node is started again FAILOVER_BACK seconds after the kill: with classic queues the
    queue lives on the killed node, and the first OK may come only once it is back.
Needs root (the cluster's servers run as the rabbitmq and postgres users); a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
from grpclib.client import Channel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_direct import publish_for  # noqa: E402
from bench.v2_common import (  # noqa: E402
    acking,
    publish_batches,
    streaming,
    table,
    write_json,
)
from eventbus._generated import mq_grpc, mq_pb2  # noqa: E402
from scripts.cluster import Cluster, RabbitNode  # noqa: E402

BATCH = 100
IN_FLIGHT = 8
BASELINE_IN_FLIGHT = 64
V1_IN_FLIGHT = 64
OUTSTANDING = 1000
DRAIN_TIMEOUT = 120.0
FAILOVER_DEADLINE = 2.0  # seconds, each publish of the failover probe
FAILOVER_BACK = 20.0  # seconds after the kill the node is started again
FAILOVER_GIVE_UP = 60.0  # seconds after the kill without an OK: no figure


@dataclass
class Figures:
    """One queue type's figures (messages/s, seconds)."""

    queue_type: str
    rates: dict[str, float] = field(default_factory=dict)
    failover: dict[str, float | None] = field(default_factory=dict)  # daemon: seconds or None
    killed: str = ""


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each rate figure")
    parser.add_argument("--daemons", type=int, default=2)
    parser.add_argument("--types", type=lambda text: text.split(","), default=["classic", "quorum"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args()


async def raw_publish(url: str, queue_type: str, seconds: float) -> float:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await declare(channel, f"bench-raw-publish-{queue_type}", queue_type)
        published, elapsed = await publish_for(channel, queue.name, seconds, BASELINE_IN_FLIGHT)
        await queue.delete(if_unused=False, if_empty=False)
    return published / elapsed


async def raw_publish_consume(url: str, queue_type: str, seconds: float) -> float:
    publishing, consuming = await aio_pika.connect(url), await aio_pika.connect(url)
    async with publishing, consuming:
        channel = await publishing.channel(publisher_confirms=True)
        queue = await declare(channel, f"bench-raw-stream-{queue_type}", queue_type)
        started = time.monotonic()
        async with acking(await consuming.channel(), queue.name, OUTSTANDING) as acked:
            published, _ = await publish_for(channel, queue.name, seconds, BASELINE_IN_FLIGHT)
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await acked.reaches(published)
        await queue.delete(if_unused=False, if_empty=False)
    return published / (acked.last - started)


async def declare(
    channel: aio_pika.abc.AbstractChannel, name: str, queue_type: str
) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})


async def bus_publish(port: int, queue: str, seconds: float) -> float:
    await publish_batches(port, queue, BATCH, 0.5, IN_FLIGHT)  # connections open, queue declared
    published, elapsed = await publish_batches(port, queue, BATCH, seconds, IN_FLIGHT)
    return published / elapsed


async def bus_publish_consume(port: int, queue: str, seconds: float) -> float:
    async with streaming(port, queue, OUTSTANDING) as acker:
        started = time.monotonic()
        published, _ = await publish_batches(port, queue, BATCH, seconds, IN_FLIGHT)
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await acker.acked.reaches(published)
    return published / (acker.acked.last - started)


async def bus_v1_publish(port: int, queue: str, seconds: float) -> float:
    channels = [Channel("127.0.0.1", port) for _ in range(4)]
    request = mq_pb2.PublishRequest(queue=queue, data="x" * 100)
    stop = time.monotonic() + seconds
    count = [0]

    async def caller(stub: mq_grpc.MqStub) -> None:
        while time.monotonic() < stop:
            await stub.publish(request)
            count[0] += 1

    started = time.monotonic()
    try:
        await asyncio.gather(
            *(caller(mq_grpc.MqStub(channels[i % 4])) for i in range(V1_IN_FLIGHT))
        )
    finally:
        for channel in channels:
            channel.close()
    return count[0] / (time.monotonic() - started)


def rates(cluster: Cluster, seconds: float) -> dict[str, float]:
    """The rate figures on cluster (the first node, the first daemon)."""
    url, port, kind = cluster.amqp_urls[0], cluster.daemons[0].grpc_port, cluster.queue_type
    return {
        "aio-pika publish": asyncio.run(raw_publish(url, kind, seconds)),
        "aio-pika publish + consume": asyncio.run(raw_publish_consume(url, kind, seconds)),
        "bus v2 publish": asyncio.run(bus_publish(port, f"bench-publish-{kind}", seconds)),
        "bus v1 publish": asyncio.run(bus_v1_publish(port, f"bench-v1-{kind}", seconds)),
        "bus v2 publish + consume": asyncio.run(
            bus_publish_consume(port, f"bench-stream-{kind}", seconds)
        ),
    }


@dataclass
class Kill:
    """When the node was killed (time.monotonic()), once it was."""

    at: float | None = None


async def probe(port: int, queue: str, kill: Kill, give_up: float) -> float | None:
    """Publish one message after another to queue through port; once the kill happened, the
    time from it to the first publish sent after it and answered OK (None: none within
    give_up)."""
    channel = Channel("127.0.0.1", port)
    stub = mq_grpc.MqStub(channel)
    request = mq_pb2.PublishRequest(queue=queue, data="failover")
    try:
        while True:
            sent = time.monotonic()
            try:
                await asyncio.wait_for(stub.publish(request, timeout=FAILOVER_DEADLINE), 3)
                ok = True
            except Exception:
                ok = False
                await asyncio.sleep(0.05)
            if kill.at is not None:
                if ok and sent >= kill.at:
                    return time.monotonic() - kill.at
                if time.monotonic() - kill.at > give_up:
                    return None
    finally:
        channel.close()


async def failover(cluster: Cluster) -> tuple[str, dict[str, float | None]]:
    """Kill the daemons' RabbitMQ node under each daemon's probe; per daemon, seconds to the
    first OK through another node (the node is started again FAILOVER_BACK s after the kill)."""
    queue = f"bench-failover-{cluster.queue_type}"
    kill = Kill()
    probes = [
        asyncio.ensure_future(probe(d.grpc_port, queue, kill, FAILOVER_GIVE_UP))
        for d in cluster.daemons
    ]
    await asyncio.sleep(3)  # the queue declared, every probe publishing
    node = connected(cluster)
    kill.at = time.monotonic()
    await asyncio.to_thread(node.kill)
    back = asyncio.ensure_future(restart_later(node, FAILOVER_BACK))
    results = await asyncio.gather(*probes)
    await back
    return node.name, {f"daemon {i + 1}": r for i, r in enumerate(results)}


async def restart_later(node: RabbitNode, delay: float) -> None:
    await asyncio.sleep(delay)
    await asyncio.to_thread(node.start)


def connected(cluster: Cluster) -> RabbitNode:
    """The node the first daemon is connected to (the first node when it does not say)."""
    name = cluster.daemons[0].connected_broker(cluster.rabbits)
    return next((n for n in cluster.rabbits if n.name == name), cluster.rabbits[0])


def measure(queue_type: str, daemons: int, seconds: float) -> Figures:
    base = Path("/tmp") / f"eventbus-cluster-bench-{uuid.uuid4().hex[:8]}"
    figures = Figures(queue_type)
    with Cluster(base, daemons=daemons, queue_type=queue_type) as cluster:
        figures.rates = rates(cluster, seconds)
        figures.killed, figures.failover = asyncio.run(failover(cluster))
    return figures


def report(all_figures: Sequence[Figures], seconds: float) -> None:
    rows = []
    for figures in all_figures:
        kind = figures.queue_type
        baseline = figures.rates["aio-pika publish"]
        both = figures.rates["aio-pika publish + consume"]
        for what, rate in figures.rates.items():
            base = both if "consume" in what else baseline
            note = "baseline" if what.startswith("aio-pika") else f"{rate / base:.2f} x aio-pika"
            rows.append((f"{kind}: {what}", f"{rate:,.0f} msgs/s", note))
    table(
        f"rates on a 3-node cluster, {seconds:g} s per figure, 100-byte persistent messages", rows
    )
    rows = []
    for figures in all_figures:
        for daemon, took in figures.failover.items():
            text = "no OK" if took is None else f"{took:.2f} s"
            note = f"{figures.killed} SIGKILLed, back after {FAILOVER_BACK:g} s"
            rows.append((f"{figures.queue_type}: {daemon}", text, note))
    table("failover: broker node killed -> first confirmed publish sent after the kill", rows)


def main() -> None:
    args = arguments()
    all_figures = [measure(kind, args.daemons, args.seconds) for kind in args.types]
    report(all_figures, args.seconds)
    write_json(
        args.json,
        {
            "benchmark": "cluster",
            "seconds": args.seconds,
            "figures": [
                {"queue_type": f.queue_type, "rates": f.rates, "failover": f.failover}
                for f in all_figures
            ],
            "failover_median": {
                f.queue_type: statistics.median([t for t in f.failover.values() if t is not None])
                if any(t is not None for t in f.failover.values())
                else None
                for f in all_figures
            },
        },
    )


if __name__ == "__main__":
    main()
