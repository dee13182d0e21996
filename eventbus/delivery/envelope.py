"""What travels through RabbitMQ: client messages with their attempt and expiry, delivery
records and settlements for the bookkeeping queues. Plain data; no I/O."""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aio_pika.abc
from pamqp.commands import Basic

PERSISTENT = 2  # AMQP delivery mode: written to disk
ATTEMPT_HEADER = "x-eventbus-attempt"
EXPIRES_AT_HEADER = "x-eventbus-expires-at"  # epoch milliseconds

Outcome = Literal["ack", "nack", "returned"]
Kind = Literal["queue", "topic"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message as the publisher sends it: its body and AMQP properties, built once."""

    body: bytes
    properties: Basic.Properties


@dataclass(frozen=True)
class Envelope:
    """A client message as the bus keeps it: the same message_id on every attempt."""

    message_id: str
    body: str
    attempt: int = 1
    expires_at: float | None = None  # epoch seconds; None never expires

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_amqp(self, now: float) -> Outgoing:
        """A persistent AMQP message; RabbitMQ drops it when the remaining TTL runs out. A first
        attempt without expiry carries no headers (a consumer reads their absence as that)."""
        headers: dict[str, Any] = {}
        if self.attempt != 1:
            headers[ATTEMPT_HEADER] = self.attempt
        expiration = None
        if self.expires_at is not None:
            headers[EXPIRES_AT_HEADER] = int(self.expires_at * 1000)
            expiration = str(max(1, int((self.expires_at - now) * 1000)))  # never 0: "now"
        properties = Basic.Properties(
            message_id=self.message_id,
            headers=headers or None,
            expiration=expiration,
            delivery_mode=PERSISTENT,
            content_type="text/plain; charset=utf-8",
        )
        return Outgoing(self.body.encode(), properties)

    @classmethod
    def from_amqp(cls, message: aio_pika.abc.AbstractIncomingMessage) -> Envelope:
        """Read back what to_amqp wrote; tolerate messages published by other clients."""
        headers = message.headers or {}
        expires_ms = headers.get(EXPIRES_AT_HEADER)
        attempt = headers.get(ATTEMPT_HEADER, 1)
        return cls(
            message_id=message_uuid(message.message_id),
            body=message.body.decode("utf-8", errors="replace"),
            attempt=attempt if isinstance(attempt, int) else 1,
            expires_at=expires_ms / 1000 if isinstance(expires_ms, int) else None,
        )


# Names the UUIDs derived from message ids of other publishers that are not UUIDs.
FOREIGN_IDS = uuid.UUID("6f1c2a4e-8b1d-4a7e-9c3f-2d5e0b7a9c11")


def message_uuid(message_id: str | None) -> str:
    """The bus's message id for an AMQP message_id: itself when it is a UUID (canonical form);
    for another producer's id ("order-17") a UUID derived from it, the same on every attempt;
    a fresh one when there is none. The bookkeeping stores message ids as UUIDs."""
    if not message_id:
        return str(uuid.uuid4())
    try:
        return str(uuid.UUID(message_id))
    except ValueError:
        return str(uuid.uuid5(FOREIGN_IDS, message_id))


def new_envelope(body: str, ttl_seconds: int, now: float) -> Envelope:
    """A fresh message; ttl_seconds 0 means it never expires."""
    return Envelope(str(uuid.uuid4()), body, 1, now + ttl_seconds if ttl_seconds > 0 else None)


@dataclass(frozen=True)
class DeliveryRecord:
    """One delivery of a message to a subscriber: the bookkeeping the republish cron acts on."""

    id: str
    message_id: str
    queue: str
    body: str
    attempt: int
    delivered_at: float
    deadline: float
    expires_at: float | None

    def encode(self) -> bytes:
        return with_body(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> DeliveryRecord:
        return cls(**without_body(raw))


@dataclass(frozen=True)
class Settlement:
    """An ack or nack of one delivery, at a time."""

    delivery_id: str
    outcome: Outcome
    at: float

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Marker:
    """A point in the settlements queue, stamped `at` before it was published: once it is
    applied, so is every settlement confirmed before that time (the queue is applied in
    order, and a confirmed message is in the queue)."""

    at: float

    def encode(self) -> bytes:
        return json.dumps({"marker": self.at}).encode()


def decode_settlement(raw: bytes) -> Settlement | Marker:
    """A message of the settlements queue: a settlement, or a marker."""
    fields = json.loads(raw)
    if isinstance(fields, dict) and set(fields) == {"marker"}:
        return Marker(_time(fields["marker"]))
    settlement = Settlement(**fields)
    _time(settlement.at)
    return settlement


LATEST_TIME = 1e11  # epoch seconds, in the year 5138: anything later is no clock's reading


def _time(value: Any) -> float:
    """A time stamp as epoch seconds (ValueError unless a number from 0 to LATEST_TIME, which
    PostgreSQL's to_timestamp takes)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a time: {value!r}")
    if not (math.isfinite(value) and 0 <= value <= LATEST_TIME):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def with_body(fields: dict[str, Any]) -> bytes:
    """A record for an internal queue: its fields but the body as one line of JSON, then the
    body as it is. JSON would escape a control character into six bytes, so a body that fits
    RabbitMQ's message size as a message could otherwise not fit as a record."""
    body: str = fields.pop("body")
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body.encode()


def without_body(raw: bytes) -> dict[str, Any]:
    """The fields with_body wrote, body included; also reads a record written as one JSON
    object, body inside (as the bus wrote them before)."""
    header, _, body = raw.partition(b"\n")
    fields: dict[str, Any] = json.loads(header)
    if not isinstance(fields, dict):
        raise ValueError("a record's first line is not a JSON object")
    if "body" not in fields:
        fields["body"] = body.decode()
    return fields


def internal_message(body: bytes) -> Outgoing:
    """A persistent message for the bus's own queues."""
    properties = Basic.Properties(
        message_id=uuid.uuid4().hex,  # RabbitMQ names a returned message by it
        delivery_mode=PERSISTENT,
        content_type="application/json",
    )
    return Outgoing(body, properties)


@dataclass(frozen=True)
class DelayedMessage:
    """A message to publish later to a queue or a topic; its id becomes the message id."""

    id: str
    kind: Kind
    target: str
    body: str
    due_at: float  # epoch seconds
    ttl_seconds: int  # counted from when it reaches its queue; 0 never expires

    def encode(self) -> bytes:
        return with_body(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> DelayedMessage:
        return cls(**without_body(raw))

    def envelope(self, now: float) -> Envelope:
        """The message as it is published when due."""
        expires_at = now + self.ttl_seconds if self.ttl_seconds > 0 else None
        return Envelope(self.id, self.body, 1, expires_at)
