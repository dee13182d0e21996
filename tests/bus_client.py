"""A small synchronous grpcio client for the v1 contract, for tests."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty

from eventbus._generated import mq_pb2


class BusClient:
    def __init__(self, address: str, service: str = "mq.Mq") -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self.service = service

    def _call(
        self, method: str, request: Any, reply: Any, timeout: float, service: str | None = None
    ) -> Any:
        call = self.channel.unary_unary(
            f"/{service or self.service}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply.FromString,
        )
        return call(request, timeout=timeout)

    def publish(self, queue: str, data: str, ttl: int = 0, timeout: float = 10) -> None:
        request = mq_pb2.PublishRequest(queue=queue, data=data, ExpirationSeconds=ttl)
        self._call("publish", request, Empty, timeout)

    def subscribe(self, queue: str, timeout: float = 10) -> mq_pb2.SubscribeResponse:
        return self._call(
            "subscribe", mq_pb2.SubscribeRequest(queue=queue), mq_pb2.SubscribeResponse, timeout
        )

    def try_subscribe(self, queue: str, timeout: float) -> mq_pb2.SubscribeResponse | None:
        """A message, or None when none arrived before the deadline."""
        try:
            return self.subscribe(queue, timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise

    def ack(self, delivery_id: str, timeout: float = 10) -> None:
        self._call("ack", mq_pb2.QueueId(id=delivery_id), Empty, timeout)

    def nack(self, delivery_id: str, timeout: float = 10) -> None:
        self._call("nack", mq_pb2.QueueId(id=delivery_id), Empty, timeout)

    def delay_publish(
        self, queue: str, data: str, delay: int, ttl: int = 0, timeout: float = 10
    ) -> None:
        request = mq_pb2.DelayPublishRequest(
            queue=queue, data=data, delaySeconds=delay, ExpirationSeconds=ttl
        )
        self._call("delayPublish", request, Empty, timeout, "mq.Mq")

    def topic_publish(self, topic: str, data: str, ttl: int = 0, timeout: float = 10) -> None:
        request = mq_pb2.TopicPublishRequest(topic=topic, data=data, ExpirationSeconds=ttl)
        self._call("publish", request, Empty, timeout, "mq.MqTopic")

    def topic_delay_publish(
        self, topic: str, data: str, delay: int, ttl: int = 0, timeout: float = 10
    ) -> None:
        request = mq_pb2.DelayTopicPublishRequest(
            topic=topic, data=data, delaySeconds=delay, ExpirationSeconds=ttl
        )
        self._call("delayPublish", request, Empty, timeout, "mq.MqTopic")

    def topic_subscribe(
        self, topic: str, queue: str, timeout: float = 10
    ) -> mq_pb2.SubscribeResponse:
        request = mq_pb2.TopicSubscribeRequest(topic=topic, queueName=queue)
        return self._call("subscribe", request, mq_pb2.SubscribeResponse, timeout, "mq.MqTopic")

    def try_topic_subscribe(
        self, topic: str, queue: str, timeout: float
    ) -> mq_pb2.SubscribeResponse | None:
        try:
            return self.topic_subscribe(topic, queue, timeout)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise

    def topic_ack(self, delivery_id: str, timeout: float = 10) -> None:
        self._call("ack", mq_pb2.QueueId(id=delivery_id), Empty, timeout, "mq.MqTopic")

    def topic_nack(self, delivery_id: str, timeout: float = 10) -> None:
        self._call("nack", mq_pb2.QueueId(id=delivery_id), Empty, timeout, "mq.MqTopic")

    def close(self) -> None:
        self.channel.close()


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status code and details a call fails with."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details()
    raise AssertionError("the call succeeded")
