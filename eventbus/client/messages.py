"""The client's messages: what is published, what a publish returns, what is received."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Self

from google.protobuf.timestamp_pb2 import Timestamp

from .._generated import v2_pb2


@dataclass(frozen=True)
class OutboundMessage:
    """One message to publish, to exactly one of a queue or a topic."""

    data: bytes
    queue: str = ""
    topic: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    ttl_seconds: int = 0
    delay_seconds: int = 0
    dedup_id: str = ""

    def __post_init__(self) -> None:
        if bool(self.queue) == bool(self.topic):
            raise ValueError("give exactly one of queue and topic")
        if not isinstance(self.data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, not {type(self.data).__name__}")

    def to_proto(self) -> v2_pb2.OutboundMessage:
        return v2_pb2.OutboundMessage(
            queue=self.queue,
            topic=self.topic,
            data=bytes(self.data),
            attributes=dict(self.attributes),
            ttl_seconds=self.ttl_seconds,
            delay_seconds=self.delay_seconds,
            dedup_id=self.dedup_id,
        )


@dataclass(frozen=True)
class PublishResult:
    """The id the bus gave a published message; duplicate: an earlier message with the same
    dedup_id was stored, and message_id is that one's."""

    message_id: str
    duplicate: bool = False

    @classmethod
    def from_proto(cls, result: v2_pb2.PublishResult) -> PublishResult:
        return cls(result.message_id, result.duplicate)


def _time(stamp: Timestamp, is_set: bool) -> datetime | None:
    return stamp.ToDatetime(tzinfo=UTC) if is_set else None


@dataclass
class ReceivedMessage:
    """A delivery: ack_id names this delivery, message_id the message (the same on every
    attempt); attempt is 1 on the first delivery; times are UTC."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    attempt: int
    publish_time: datetime | None
    deadline: datetime | None
    queue: str

    @classmethod
    def from_proto(cls, pb: v2_pb2.ReceivedMessage) -> Self:
        return cls(
            ack_id=pb.ack_id,
            message_id=pb.message_id,
            data=pb.data,
            attributes=dict(pb.attributes),
            attempt=pb.attempt,
            publish_time=_time(pb.publish_time, pb.HasField("publish_time")),
            deadline=_time(pb.deadline, pb.HasField("deadline")),
            queue=pb.queue,
        )


Settle = Callable[["Message", bool], None]


@dataclass(eq=False)
class Message(ReceivedMessage):
    """A delivery handed to a subscriber's handler.

    The handler may call ack() or nack() itself; otherwise the subscriber acks when the handler
    returns and nacks when it raises. Only the first of these counts. Both return at once: the
    subscriber sends them on its stream in batches."""

    _settle: Settle | None = field(default=None, repr=False)
    _settled: bool = field(default=False, repr=False)

    @classmethod
    def delivered(cls, pb: v2_pb2.ReceivedMessage, settle: Settle) -> Message:
        """The message from the wire, reporting its ack or nack to `settle`."""
        message = cls.from_proto(pb)
        message._settle = settle
        return message

    def ack(self) -> None:
        """Done with the message: the bus forgets it."""
        self._finish(True)

    def nack(self) -> None:
        """Give the message back: the bus delivers it again after its queue's backoff."""
        self._finish(False)

    @property
    def settled(self) -> bool:
        """Whether ack() or nack() was called."""
        return self._settled

    def _finish(self, ack: bool) -> None:
        if self._settled:
            return
        self._settled = True
        if self._settle is not None:
            self._settle(self, ack)
