"""Memory under a backlog of large messages: starts a real daemon, publishes COUNT messages of
SIZE_KIB each to one queue through gRPC, then pulls one and waits 10 s (the consumers prefetch
meanwhile), pulls and acks the rest (subscribe+ack, 16 at a time), and prints the daemon's RSS
(VmRSS) before, after publishing, once prefetched, at its peak while the backlog drains, and 2 s
and 20 s after the drain, beside amqp.buffer_max_bytes, the bytes the buffers held and how long
publishing and draining took.

Usage: python bench/memory.py [COUNT] [SIZE_KIB] [BUFFER_MAX_MIB] [VAR=VALUE ...]
(defaults: 2000 256 64; VAR=VALUE pairs go to the daemon's environment, e.g.
MALLOC_MMAP_THRESHOLD_=131072 or EVENTBUS_AMQP__PREFETCH_COUNT=100)
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import rss_mib  # noqa: E402
from eventbus._generated import mq_grpc, mq_pb2  # noqa: E402
from tests import servers  # noqa: E402
from tests.conftest import Backends  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402

CONCURRENCY = 16
QUEUE = "large"
PREFETCH_SECONDS = 10


class Peaks:
    """Samples the daemon's RSS every 20 ms in a thread, and its buffered bytes (from /metrics)
    every 10th time; the largest of each seen."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.peak = 0.0
        self.buffered = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        ticks = 0
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.daemon.process.pid))
            ticks += 1
            if ticks % 10 == 0:
                self.buffered = max(self.buffered, buffered_mib(self.daemon))

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def buffered_mib(daemon: DaemonProcess) -> float:
    _, text = daemon.http_get("/metrics")
    lines = [line for line in text.splitlines() if line.startswith("eventbus_buffered_bytes{")]
    return sum(float(line.split()[-1]) for line in lines) / 1024 / 1024


async def in_parallel(count: int, call: object) -> None:
    """Run call(i) for i < count, CONCURRENCY at a time; UNAVAILABLE (RabbitMQ blocking
    publishers for a while, say) is tried again a second later."""
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            while True:
                try:
                    await call(i)  # type: ignore[operator]
                    break
                except GRPCError as error:
                    if error.status is not Status.UNAVAILABLE:
                        raise
                    await asyncio.sleep(1)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def backlog(daemon: DaemonProcess, count: int, size: int) -> None:
    channel = Channel("127.0.0.1", daemon.grpc_port)
    stub = mq_grpc.MqStub(channel)
    pid = daemon.process.pid
    data = "x" * size
    print(f"before:            RSS {rss_mib(pid):6.1f} MiB")

    async def publish(_: int) -> None:
        await stub.publish(mq_pb2.PublishRequest(queue=QUEUE, data=data), timeout=60)

    async def pull(_: int) -> None:
        reply = await stub.subscribe(mq_pb2.SubscribeRequest(queue=QUEUE), timeout=60)
        await stub.ack(mq_pb2.QueueId(id=reply.id), timeout=60)

    started = time.monotonic()
    with Peaks(daemon) as publishing:
        await in_parallel(count, publish)
    took = time.monotonic() - started
    print(
        f"published {count} in {took:5.1f} s: RSS {rss_mib(pid):6.1f} MiB "
        f"(peak {publishing.peak:6.1f})"
    )
    with Peaks(daemon) as prefetching:
        await pull(0)  # starts the queue's consumers, which prefetch while nobody pulls
        await asyncio.sleep(PREFETCH_SECONDS)
    print(
        f"one pulled, {PREFETCH_SECONDS} s later: RSS {rss_mib(pid):6.1f} MiB "
        f"(peak {prefetching.peak:6.1f}), buffered {buffered_mib(daemon):5.1f} MiB"
    )
    started = time.monotonic()
    with Peaks(daemon) as draining:
        await in_parallel(count - 1, pull)
    took = time.monotonic() - started
    print(
        f"drained {count} in {took:5.1f} s: peak RSS {draining.peak:6.1f} MiB, "
        f"buffered at most {draining.buffered:5.1f} MiB"
    )
    for wait in (2, 18):
        await asyncio.sleep(wait)
        print(f"after the drain, {wait if wait == 2 else 20:2d} s: RSS {rss_mib(pid):6.1f} MiB")
    channel.close()


def main(count: int, size_kib: int, cap_mib: int, env: dict[str, str]) -> None:
    name = servers.unique_name("eventbus_memory")
    url, dsn = servers.create_vhost(name), servers.create_database(name)
    backends = Backends(url, dsn, name + ":", "memory")
    print(f"{count} x {size_kib} KiB; amqp.buffer_max_bytes {cap_mib} MiB; environment {env}")
    daemon = DaemonProcess(
        Path("/tmp") / name,
        backends,
        env=env,
        log={"level": "info"},
        amqp={"buffer_max_bytes": cap_mib * 1024 * 1024},
        server={"max_message_bytes": 2 * size_kib * 1024 + 4096},
    )
    try:
        daemon.wait_ready()
        asyncio.run(backlog(daemon, count, size_kib * 1024))
    finally:
        daemon.kill()
        servers.delete_vhost(name)
        servers.drop_database(name)
        servers.delete_redis_keys(name + ":")


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:] if "=" not in a]
    variables = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    count, size_kib, cap_mib = (
        [*numbers, 2000, 256, 64][:3]
        if not numbers
        else (numbers + [2000, 256, 64][len(numbers) :])
    )
    main(count, size_kib, cap_mib, variables)
