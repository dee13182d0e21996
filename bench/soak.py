"""Soak: steady publish+subscribe+ack traffic through one daemon, about a quarter of it published
with a one-second delay, printing the daemon's memory (RSS) as it goes, to show it stays flat.

Usage: python bench/soak.py [MINUTES] [RATE_PER_SECOND]   (defaults: 60 minutes, 200 msgs/s)
Prints one line per minute: elapsed, messages so far, RSS in MiB; then first vs last and the
largest RSS.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from grpclib.client import Channel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_direct import bench_backends, running_daemon  # noqa: E402
from eventbus._generated import mq_grpc, mq_pb2  # noqa: E402

WORKERS = 64
DELAYED_EVERY = 4  # about one message in four goes through delayPublish (1 s) instead


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def traffic(port: int, minutes: float, rate: float, pid: int) -> tuple[list[float], int]:
    channel = Channel("127.0.0.1", port)
    stub = mq_grpc.MqStub(channel)
    done = [0]
    stop_at = time.monotonic() + minutes * 60
    interval = WORKERS / rate

    async def worker(number: int) -> None:
        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            data = f"{number}:{done[0]}"
            if done[0] % DELAYED_EVERY == number % DELAYED_EVERY:
                delayed = mq_pb2.DelayPublishRequest(queue="soak", data=data, delaySeconds=1)
                await stub.delayPublish(delayed)
            else:
                await stub.publish(mq_pb2.PublishRequest(queue="soak", data=data))
            reply = await stub.subscribe(mq_pb2.SubscribeRequest(queue="soak"), timeout=30)
            await stub.ack(mq_pb2.QueueId(id=reply.id))
            done[0] += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def report() -> list[float]:
        samples, started = [], time.monotonic()
        while time.monotonic() < stop_at:
            samples.append(rss_mib(pid))
            print(
                f"  {(time.monotonic() - started) / 60:5.1f} min  {done[0]:>9} msgs  "
                f"RSS {samples[-1]:7.1f} MiB",
                flush=True,
            )
            await asyncio.sleep(min(60.0, max(1.0, stop_at - time.monotonic())))
        samples.append(rss_mib(pid))
        return samples

    workers = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
    samples = await report()
    await asyncio.gather(*workers)
    channel.close()
    return samples, done[0]


def main(minutes: float, rate: float) -> None:
    print(
        f"soak: {minutes:g} min of publish+subscribe+ack at {rate:g} msgs/s, "
        f"1 in {DELAYED_EVERY} delayed by 1 s"
    )
    with bench_backends() as (url, dsn, prefix), running_daemon(url, dsn, prefix) as port:
        pid = daemon_pid(port)
        samples, messages = asyncio.run(traffic(port, minutes, rate, pid))
    print(
        f"  {messages} round trips; RSS first {samples[0]:.1f} MiB, last {samples[-1]:.1f} MiB, "
        f"largest {max(samples):.1f} MiB"
    )


def daemon_pid(port: int) -> int:
    """The daemon listening on port (the bench starts exactly one)."""
    import subprocess

    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True)
    return int(out.stdout.split("pid=")[1].split(",")[0])


if __name__ == "__main__":
    main(
        float(sys.argv[1]) if len(sys.argv) > 1 else 60.0,
        float(sys.argv[2]) if len(sys.argv) > 2 else 200.0,
    )
