"""Direct-queue throughput of the bus, printed beside its baselines measured in the same run:
a do-nothing grpclib server of the same contract, and aio-pika straight to RabbitMQ.

Usage: python bench/bench_direct.py [SECONDS] [CONCURRENCY]
Needs the local RabbitMQ, PostgreSQL and Redis (as `make test` leaves them); uses a RabbitMQ
vhost and a database of its own and removes both afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika

ROOT = Path(__file__).resolve().parent.parent
DAEMON_LOG = Path(tempfile.gettempdir()) / "eventbus-bench-daemon.log"  # kept for a look after
sys.path.insert(0, str(ROOT))

from tests import servers  # noqa: E402
from tests.daemon_process import to_toml  # noqa: E402


def run_load(address: str, mode: str, seconds: float, concurrency: int, queue: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "load.py"),
            address,
            mode,
            str(seconds),
            str(concurrency),
            queue,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    return json.loads(out.stdout)


def server_publish_rate(
    script: str, args: list[str], seconds: float, concurrency: int, queue: str
) -> float:
    """Unary publish rate of a bench/ server script started on a free port."""
    port = servers.free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / script), str(port), *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        result = run_load(f"127.0.0.1:{port}", "publish", seconds, concurrency, queue)
    finally:
        server.terminate()
        server.wait(10)
    return result["calls"] / result["seconds"]


async def publish_for(
    channel: aio_pika.abc.AbstractChannel, queue: str, seconds: float, concurrency: int
) -> tuple[int, float]:
    """Publish persistent 100-byte messages to queue with confirms, from concurrency tasks, for
    seconds; returns (messages confirmed, seconds taken)."""
    body = b"x" * 100
    counts, started = [0], time.monotonic()

    async def publisher() -> None:
        while time.monotonic() < started + seconds:
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await channel.default_exchange.publish(message, routing_key=queue)
            counts[0] += 1

    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    return counts[0], time.monotonic() - started


async def aio_pika_publish_rate(url: str, seconds: float, concurrency: int) -> float:
    """Raw aio-pika publish-with-confirms rate, to a durable queue deleted afterwards."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("bench-raw-publish", durable=True)
        published, elapsed = await publish_for(channel, queue.name, seconds, concurrency)
        await queue.delete(if_unused=False, if_empty=False)
    return published / elapsed


async def aio_pika_rates(url: str, seconds: float, concurrency: int) -> dict[str, float]:
    """Publish with confirms (persistent, durable queue), then consume with acks; then both at
    once, as the bus does them."""
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue("bench-raw", durable=True)

    published, elapsed = await publish_for(channel, "bench-raw", seconds, concurrency)
    rates = {"publish": published / elapsed}

    consumer_channel = await connection.channel()
    await consumer_channel.set_qos(prefetch_count=1000)
    consumed = [0]
    done = asyncio.Event()
    target = [published]

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        consumed[0] += 1
        if consumed[0] >= target[0]:
            done.set()

    consumer_queue = await consumer_channel.get_queue("bench-raw")
    started = time.monotonic()
    tag = await consumer_queue.consume(on_message)
    await done.wait()
    rates["consume"] = published / (time.monotonic() - started)

    consumed[0], done = 0, asyncio.Event()
    target[0] = 10**12
    started = time.monotonic()
    await publish_for(channel, "bench-raw", seconds, concurrency)
    rates["publish+consume"] = consumed[0] / (time.monotonic() - started)
    await consumer_queue.cancel(tag)
    await queue.delete(if_unused=False, if_empty=False)
    await connection.close()
    return rates


def start_daemon(url: str, dsn: str, prefix: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    grpc_port, http_port = servers.free_port(), servers.free_port()
    config = tmp / "config.toml"
    config.write_text(
        to_toml(
            {
                "server": {
                    "grpc_host": "127.0.0.1",
                    "grpc_port": grpc_port,
                    "http_host": "127.0.0.1",
                    "http_port": http_port,
                },
                "amqp": {"url": url, "namespace": "bench"},
                "postgres": {"dsn": dsn},
                "redis": {"key_prefix": prefix},
                "log": {"level": os.environ.get("EVENTBUS_BENCH_LOG", "warning")},
            }
        )
    )
    log = open(DAEMON_LOG, "wb")  # noqa: SIM115 (lives as long as the daemon)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "eventbus", "serve", "--config", str(config)], stderr=log
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1):
                return daemon, grpc_port
        except OSError:
            time.sleep(0.2)
    daemon.kill()
    raise SystemExit("the daemon did not become ready")


@contextlib.contextmanager
def bench_backends() -> Iterator[tuple[str, str, str]]:
    """A RabbitMQ vhost, a database and a Redis prefix of the run's own, removed afterwards:
    yields (amqp url, postgres dsn, redis prefix)."""
    vhost, database = servers.unique_name("eventbus_bench"), servers.unique_name("eventbus_bench")
    prefix = servers.unique_name("eventbus_bench") + ":"
    try:
        yield servers.create_vhost(vhost), servers.create_database(database), prefix
    finally:
        servers.delete_vhost(vhost)
        servers.drop_database(database)
        servers.delete_redis_keys(prefix)


@contextlib.contextmanager
def running_daemon(url: str, dsn: str, prefix: str) -> Iterator[int]:
    """A daemon on those backends for the duration; yields its gRPC port."""
    with tempfile.TemporaryDirectory() as tmp:
        daemon, port = start_daemon(url, dsn, prefix, Path(tmp))
        try:
            yield port
        finally:
            daemon.terminate()
            daemon.wait(30)


def main(seconds: float, concurrency: int) -> None:
    with bench_backends() as (url, dsn, prefix):
        noop = server_publish_rate("noop_server.py", [], seconds, concurrency, "noop")
        relay = server_publish_rate("relay_server.py", [url], seconds, concurrency, "relay")
        raw = asyncio.run(aio_pika_rates(url, seconds, concurrency))
        with running_daemon(url, dsn, prefix) as port:
            address = f"127.0.0.1:{port}"
            publish = run_load(address, "publish", seconds, concurrency, "bench-publish")
            trip = run_load(address, "roundtrip", seconds, concurrency, "bench-roundtrip")
    report(noop, relay, raw, publish, trip, seconds, concurrency)


def report(
    noop: float,
    relay: float,
    raw: dict[str, float],
    publish: dict,
    trip: dict,
    seconds: float,
    concurrency: int,
) -> None:
    bus_publish = publish["calls"] / publish["seconds"]
    bus_trip = trip["operations"] / trip["seconds"]
    print(
        f"direct queues, {seconds:g} s per figure, {concurrency} concurrent callers, 100-byte "
        "messages"
    )
    rows = [
        ("grpclib do-nothing server, unary publish", noop, "calls/s", ""),
        ("aio-pika publish (confirms, persistent)", raw["publish"], "msgs/s", ""),
        ("aio-pika consume (acks)", raw["consume"], "msgs/s", ""),
        ("aio-pika publish + consume at once", raw["publish+consume"], "msgs/s", ""),
        (
            "plain-asyncio grpclib->aio-pika relay",
            relay,
            "calls/s",
            f"{relay / noop:.2f} x grpclib floor (reference: no bus logic at all)",
        ),
        (
            "bus publish",
            bus_publish,
            "calls/s",
            f"{bus_publish / noop:.2f} x grpclib floor (goal >= 0.80)",
        ),
        (
            "bus publish+subscribe+ack",
            bus_trip,
            "msgs/s",
            f"{bus_trip / (noop / 3):.2f} x floor/3 (goal >= 0.60); "
            f"{bus_trip / raw['publish+consume']:.2f} x aio-pika publish+consume",
        ),
    ]
    for name, rate, unit, note in rows:
        print(f"  {name:<42} {rate:>9.0f} {unit:<8} {note}")


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 10.0,
        int(sys.argv[2]) if len(sys.argv) > 2 else 64,
    )
