"""The v1 gRPC services mq.Mq and mq.MqTopic, wire-compatible with the original clients."""

from __future__ import annotations

from typing import Any

from ._generated import mq_grpc, mq_pb2
from .rpc import Gate, NotImplementedYet


async def _not_yet(_request: Any) -> Any:
    raise NotImplementedYet("not implemented by this version of eventbus")


class MqService(mq_grpc.MqBase):
    """Direct queues."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def publish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/publish", _not_yet)

    async def delayPublish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/delayPublish", _not_yet)

    async def subscribe(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/subscribe", _not_yet)

    async def ack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/ack", _not_yet)

    async def nack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.Mq/nack", _not_yet)


class MqTopicService(mq_grpc.MqTopicBase):
    """Topic exchanges with a queue per subscriber group."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    async def publish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/publish", _not_yet)

    async def delayPublish(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/delayPublish", _not_yet)

    async def subscribe(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/subscribe", _not_yet)

    async def ack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/ack", _not_yet)

    async def nack(self, stream: Any) -> None:
        await self._gate.unary(stream, "mq.MqTopic/nack", _not_yet)


__all__ = ["MqService", "MqTopicService", "mq_pb2"]
