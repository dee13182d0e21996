"""The baseline: a grpclib server of the v1 contract whose publish does nothing.

Usage: python bench/noop_server.py PORT
"""

import asyncio
import sys

from google.protobuf.empty_pb2 import Empty
from grpclib.server import Server

from eventbus._generated import mq_grpc


class NoopMq(mq_grpc.MqBase):
    async def publish(self, stream):  # type: ignore[no-untyped-def]
        await stream.recv_message()
        await stream.send_message(Empty())

    delayPublish = subscribe = ack = nack = publish


async def main(port: int) -> None:
    server = Server([NoopMq()])
    await server.start("127.0.0.1", port)
    print("ready", flush=True)
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
