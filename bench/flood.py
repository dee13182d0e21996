"""Flood: publishes to many distinct queues and subscribes to many others, as a careless or
hostile client would, then checks the daemon still serves. Prints the channels of the daemon's
RabbitMQ connection and its memory (RSS) before, after each flood and once idle again, the
status codes the subscribes got, and how long a well-behaved round trip took meanwhile.

Usage: python bench/flood.py [QUEUES_PUBLISHED] [QUEUES_SUBSCRIBED] [ROUNDS]
(defaults: 10000 2000 1; each round floods with new queue names, then waits until it is idle)
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import rss_mib  # noqa: E402
from eventbus._generated import mq_grpc, mq_pb2  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import Backends  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

CONCURRENCY = 64


def channels(vhost: str) -> int:
    return sum(int(n) for (n,) in servers.connections(vhost, "channels") if n.isdigit())


async def in_parallel(count: int, call: object) -> Counter[str]:
    """Run call(i) for i < count, CONCURRENCY at a time; count the status codes."""
    codes: Counter[str] = Counter()
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            try:
                await call(i)  # type: ignore[operator]
                codes["OK"] += 1
            except GRPCError as error:
                codes[error.status.name] += 1
            except TimeoutError:  # grpclib's client raises this when the deadline passes
                codes["DEADLINE_EXCEEDED"] += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return codes


async def round_trip(stub: mq_grpc.MqStub) -> float:
    started = time.monotonic()
    await stub.publish(mq_pb2.PublishRequest(queue="honest", data="x"), timeout=30)
    reply = await stub.subscribe(mq_pb2.SubscribeRequest(queue="honest"), timeout=30)
    await stub.ack(mq_pb2.QueueId(id=reply.id), timeout=30)
    return time.monotonic() - started


async def flood(
    daemon: DaemonProcess, vhost: str, published: int, subscribed: int, rounds: int
) -> None:
    channel = Channel("127.0.0.1", daemon.grpc_port)
    stub = mq_grpc.MqStub(channel)
    pid = daemon.process.pid
    await round_trip(stub)
    print(f"before:  {channels(vhost):5d} channels, RSS {rss_mib(pid):6.1f} MiB")

    for round_ in range(rounds):

        async def publish(i: int, round_: int = round_) -> None:
            queue = f"flood-{round_}-{i}"
            await stub.publish(mq_pb2.PublishRequest(queue=queue, data="x"), timeout=30)

        async def subscribe(i: int, round_: int = round_) -> None:
            queue = f"empty-{round_}-{i}"
            await stub.subscribe(mq_pb2.SubscribeRequest(queue=queue), timeout=1)

        floods = (("publish", published, publish), ("subscribe", subscribed, subscribe))
        for name, count, call in floods:
            started = time.monotonic()
            codes = await in_parallel(count, call)
            seconds = time.monotonic() - started
            trip = await round_trip(stub)
            print(
                f"{name:9s}{count:6d} queues in {seconds:5.1f} s: {dict(codes)}; then "
                f"{channels(vhost):4d} channels, RSS {rss_mib(pid):6.1f} MiB, "
                f"round trip {trip:.2f} s"
            )
        await asyncio.sleep(70)  # the flood's consumers go idle after amqp.consumer_idle_seconds
        print(f"idle:    {channels(vhost):5d} channels, RSS {rss_mib(pid):6.1f} MiB")
    channel.close()


def main(published: int = 10_000, subscribed: int = 2_000, rounds: int = 1) -> None:
    vhost, database = servers.unique_name("eventbus_flood"), servers.unique_name("eventbus_flood")
    prefix = servers.unique_name("eventbus_flood") + ":"
    url, dsn = servers.create_vhost(vhost), servers.create_database(database)
    backends = Backends(url, dsn, prefix, "flood")
    daemon = DaemonProcess(Path("/tmp") / vhost, backends, log={"level": "info"})
    try:
        daemon.wait_ready()
        asyncio.run(flood(daemon, vhost, published, subscribed, rounds))
        print(f"daemon still running: {daemon.process.poll() is None}")
    finally:
        daemon.kill()
        servers.delete_vhost(vhost)
        servers.drop_database(database)
        servers.delete_redis_keys(prefix)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
