"""The v1 gRPC services mq.Mq and mq.MqTopic, wire-compatible with the original clients.

Each method only translates between protobuf messages and the delivery logic; the gate around
it maps errors to status codes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from .._generated import mq_grpc, mq_pb2
from ..delivery.envelope import DeliveryRecord
from ..delivery.operations import Delivery
from ..security.access import Permission, caller, require
from ..security.quotas import Quotas
from .rpc import Gate

PUBLISH, SUBSCRIBE = Permission.PUBLISH, Permission.SUBSCRIBE

EMPTY = Empty()


class SizeLimitedCodec(ProtoCodec):
    """The protobuf codec, refusing requests over server.max_message_bytes (grpclib has no
    limit of its own)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__()
        self.max_bytes = max_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        """The message, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming what is wrong.

        The size is checked on the length prefix before the body is read (framing.py); this
        check stays for any path that hands the codec a body directly."""
        if len(data) > self.max_bytes:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"request of {len(data)} bytes is over the limit of {self.max_bytes} bytes "
                "(server.max_message_bytes)",
            )
        try:
            return super().decode(data, message_type)
        except DecodeError as error:
            name = getattr(message_type, "__name__", "message")
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"malformed {name}: {error or 'not valid protobuf'}"
            ) from None


def _reply(record: DeliveryRecord) -> mq_pb2.SubscribeResponse:
    return mq_pb2.SubscribeResponse(id=record.id, data=record.body.decode(), queue=record.queue)


class _Service:
    """What both services share: the gate, the delivery logic, ack and nack."""

    def __init__(self, gate: Gate, delivery: Delivery, quotas: Quotas | None = None) -> None:
        self._gate = gate
        self._delivery = delivery
        self._quotas = quotas or Quotas()

    async def _ack(self, request: mq_pb2.QueueId) -> Empty:
        await self._delivery.ack(request.id)
        return EMPTY

    async def _nack(self, request: mq_pb2.QueueId) -> Empty:
        await self._delivery.nack(request.id)
        return EMPTY


class MqService(_Service, mq_grpc.MqBase):
    """Direct queues."""

    async def publish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/publish", self._publish)

    async def delayPublish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/delayPublish", self._delay_publish)

    async def subscribe(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/subscribe", self._subscribe)

    async def ack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/ack", self._ack)

    async def nack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/nack", self._nack)

    async def _publish(self, request: mq_pb2.PublishRequest) -> Empty:
        self._quotas.publish(require(PUBLISH, request.queue))
        await self._delivery.publish(request.queue, request.data, request.ExpirationSeconds)
        return EMPTY

    async def _delay_publish(self, request: mq_pb2.DelayPublishRequest) -> Empty:
        self._quotas.publish(require(PUBLISH, request.queue))
        await self._delivery.delay_publish(
            ("queue", request.queue), request.data, request.delaySeconds, request.ExpirationSeconds
        )
        return EMPTY

    async def _subscribe(self, request: mq_pb2.SubscribeRequest) -> mq_pb2.SubscribeResponse:
        require(SUBSCRIBE, request.queue)
        with self._quotas.waiting_pull(caller()):
            return _reply(await self._delivery.subscribe(request.queue))


class MqTopicService(_Service, mq_grpc.MqTopicBase):
    """Topic exchanges with a queue per subscriber group."""

    async def publish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/publish", self._publish)

    async def delayPublish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/delayPublish", self._delay_publish)

    async def subscribe(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/subscribe", self._subscribe)

    async def ack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/ack", self._ack)

    async def nack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/nack", self._nack)

    async def _publish(self, request: mq_pb2.TopicPublishRequest) -> Empty:
        self._quotas.publish(require(PUBLISH, request.topic))
        await self._delivery.publish_topic(request.topic, request.data, request.ExpirationSeconds)
        return EMPTY

    async def _delay_publish(self, request: mq_pb2.DelayTopicPublishRequest) -> Empty:
        self._quotas.publish(require(PUBLISH, request.topic))
        await self._delivery.delay_publish(
            ("topic", request.topic), request.data, request.delaySeconds, request.ExpirationSeconds
        )
        return EMPTY

    async def _subscribe(self, request: mq_pb2.TopicSubscribeRequest) -> mq_pb2.SubscribeResponse:
        # The group queue is bound to the topic: reading it reads both.
        require(SUBSCRIBE, request.topic)
        require(SUBSCRIBE, request.queueName)
        with self._quotas.waiting_pull(caller()):
            return _reply(await self._delivery.subscribe_topic(request.topic, request.queueName))
