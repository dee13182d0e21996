"""A reference point: the least a publish through grpclib and aio-pika can cost on plain asyncio.

Its publish relays the message to RabbitMQ (persistent, confirmed) and answers; nothing else.
Usage: python bench/relay_server.py PORT AMQP_URL
"""

import asyncio
import sys

import aio_pika
from google.protobuf.empty_pb2 import Empty
from grpclib.server import Server

from eventbus._generated import mq_grpc


class RelayMq(mq_grpc.MqBase):
    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel

    async def publish(self, stream):  # type: ignore[no-untyped-def]
        request = await stream.recv_message()
        message = aio_pika.Message(request.data.encode(), delivery_mode=2)
        await self.channel.default_exchange.publish(message, routing_key=request.queue)
        await stream.send_message(Empty())

    delayPublish = subscribe = ack = nack = publish


async def main(port: int, url: str) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    await channel.declare_queue("relay", durable=True)
    server = Server([RelayMq(channel)])
    await server.start("127.0.0.1", port)
    print("ready", flush=True)
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
