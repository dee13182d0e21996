"""The v1 calls (services mq.Mq and mq.MqTopic), for code written against the original
contract: string data, one message per call, ids acked one by one."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass

from grpclib.const import Status

from .._generated import mq_pb2
from .channel import Connection
from .errors import RpcError, translated


@dataclass(frozen=True)
class V1Message:
    """A message from a v1 subscribe: `id` names this delivery (ack or nack it)."""

    id: str
    data: str
    queue: str


class V1:
    """client.v1: each call waits for the daemon's answer (publish: until RabbitMQ confirmed
    the message) and raises RpcError when the call fails."""

    def __init__(self, connection: Connection, timeout: float | None) -> None:
        self._connection = connection
        self._timeout = timeout

    async def publish(self, queue: str, data: str, expiration_seconds: int = 0) -> None:
        request = mq_pb2.PublishRequest(
            queue=queue, data=data, ExpirationSeconds=expiration_seconds
        )
        with translated():
            await self._connection.stubs.mq.publish(request, timeout=self._timeout)

    async def delay_publish(
        self, queue: str, data: str, delay_seconds: int, expiration_seconds: int = 0
    ) -> None:
        request = mq_pb2.DelayPublishRequest(
            queue=queue, data=data, delaySeconds=delay_seconds, ExpirationSeconds=expiration_seconds
        )
        with translated():
            await self._connection.stubs.mq.delayPublish(request, timeout=self._timeout)

    async def subscribe(self, queue: str, *, wait_seconds: float | None = None) -> V1Message | None:
        """One message of the queue, waiting for one up to wait_seconds (default: the client's
        timeout); None when none came."""
        request = mq_pb2.SubscribeRequest(queue=queue)
        method = self._connection.stubs.mq.subscribe
        return await self._pull_one(method(request, timeout=wait_seconds or self._timeout))

    async def ack(self, delivery_id: str) -> None:
        with translated():
            await self._connection.stubs.mq.ack(
                mq_pb2.QueueId(id=delivery_id), timeout=self._timeout
            )

    async def nack(self, delivery_id: str) -> None:
        """Give the message back: delivered again after delivery.nack_redelivery_delay_seconds."""
        with translated():
            await self._connection.stubs.mq.nack(
                mq_pb2.QueueId(id=delivery_id), timeout=self._timeout
            )

    async def topic_publish(self, topic: str, data: str, expiration_seconds: int = 0) -> None:
        """Publish to every queue bound to the topic."""
        request = mq_pb2.TopicPublishRequest(
            topic=topic, data=data, ExpirationSeconds=expiration_seconds
        )
        with translated():
            await self._connection.stubs.mq_topic.publish(request, timeout=self._timeout)

    async def topic_delay_publish(
        self, topic: str, data: str, delay_seconds: int, expiration_seconds: int = 0
    ) -> None:
        request = mq_pb2.DelayTopicPublishRequest(
            topic=topic, data=data, delaySeconds=delay_seconds, ExpirationSeconds=expiration_seconds
        )
        with translated():
            await self._connection.stubs.mq_topic.delayPublish(request, timeout=self._timeout)

    async def topic_subscribe(
        self, topic: str, queue: str, *, wait_seconds: float | None = None
    ) -> V1Message | None:
        """One message of `queue`, declared and bound to the topic on the first call; None when
        none came within wait_seconds (default: the client's timeout)."""
        request = mq_pb2.TopicSubscribeRequest(topic=topic, queueName=queue)
        method = self._connection.stubs.mq_topic.subscribe
        return await self._pull_one(method(request, timeout=wait_seconds or self._timeout))

    async def topic_ack(self, delivery_id: str) -> None:
        request = mq_pb2.QueueId(id=delivery_id)
        with translated():
            await self._connection.stubs.mq_topic.ack(request, timeout=self._timeout)

    async def topic_nack(self, delivery_id: str) -> None:
        request = mq_pb2.QueueId(id=delivery_id)
        with translated():
            await self._connection.stubs.mq_topic.nack(request, timeout=self._timeout)

    @staticmethod
    async def _pull_one(call: Awaitable[mq_pb2.SubscribeResponse]) -> V1Message | None:
        try:
            with translated():
                reply = await call
        except RpcError as error:
            if error.status == Status.DEADLINE_EXCEEDED:
                return None
            raise
        return V1Message(reply.id, reply.data, reply.queue)
