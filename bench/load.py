"""A gRPC load generator (grpclib client on asyncio): CONCURRENCY callers for SECONDS.

Usage: python bench/load.py HOST:PORT MODE SECONDS CONCURRENCY QUEUE
MODE publish: one unary publish per operation.
MODE roundtrip: publish, subscribe, ack per operation (three calls).
Prints {"operations": N, "calls": N, "seconds": S} as JSON.
"""

import asyncio
import json
import sys
import time

from grpclib.client import Channel

from eventbus._generated import mq_grpc, mq_pb2


async def caller(
    stub: mq_grpc.MqStub, mode: str, queue: str, stop_at: float, counts: list[int]
) -> None:
    payload = "x" * 100
    while time.monotonic() < stop_at:
        await stub.publish(mq_pb2.PublishRequest(queue=queue, data=payload))
        if mode == "roundtrip":
            reply = await stub.subscribe(mq_pb2.SubscribeRequest(queue=queue), timeout=10)
            await stub.ack(mq_pb2.QueueId(id=reply.id))
        counts[0] += 1


async def main(address: str, mode: str, seconds: float, concurrency: int, queue: str) -> None:
    host, port = address.rsplit(":", 1)
    channels = [Channel(host, int(port)) for _ in range(4)]
    stubs = [mq_grpc.MqStub(channel) for channel in channels]
    counts = [0]
    await stubs[0].publish(mq_pb2.PublishRequest(queue=queue, data="warm-up"))
    if mode == "roundtrip":
        reply = await stubs[0].subscribe(mq_pb2.SubscribeRequest(queue=queue), timeout=10)
        await stubs[0].ack(mq_pb2.QueueId(id=reply.id))
    started = time.monotonic()
    await asyncio.gather(
        *(caller(stubs[i % 4], mode, queue, started + seconds, counts) for i in range(concurrency))
    )
    elapsed = time.monotonic() - started
    for channel in channels:
        channel.close()
    calls = counts[0] * (3 if mode == "roundtrip" else 1)
    print(json.dumps({"operations": counts[0], "calls": calls, "seconds": elapsed}))


if __name__ == "__main__":
    address, mode, seconds, concurrency, queue = sys.argv[1:6]
    asyncio.run(main(address, mode, float(seconds), int(concurrency), queue))
