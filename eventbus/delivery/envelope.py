"""What travels through RabbitMQ: client messages with their attempt and expiry, delivery
records and settlements for the bookkeeping queues. Plain data; no I/O.

A message body is bytes everywhere inside the bus; a message's attributes travel as AMQP headers
under their own names, beside the bus's own headers (named x-eventbus-...)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Generic, Literal, TypeVar

import aio_pika.abc
from pamqp.commands import Basic

PERSISTENT = 2  # AMQP delivery mode: written to disk
BUS_HEADERS = "x-eventbus-"  # the prefix of the bus's own headers; any other is an attribute
ATTEMPT_HEADER = "x-eventbus-attempt"
MAX_ATTEMPT = 1_000_000  # another publisher's header beyond it (or below 1) reads as attempt 1
ROWS_HEADER = "x-eventbus-rows"  # how many records or settlements a packed message carries
EXPIRES_AT_HEADER = "x-eventbus-expires-at"  # epoch milliseconds
PUBLISHED_AT_HEADER = "x-eventbus-published-at"  # epoch milliseconds
CONTENT_TYPE = "application/octet-stream"

NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})

T = TypeVar("T")


def no_attributes() -> Mapping[str, str]:
    """The default attributes: one shared empty mapping, never copied."""
    return NO_ATTRIBUTES


Outcome = Literal["ack", "nack", "returned", "deadline"]
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
    body: bytes
    attempt: int = 1
    expires_at: float | None = None  # epoch seconds; None never expires
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    published_at: float | None = None  # epoch seconds: when it was first published

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_amqp(self, now: float) -> Outgoing:
        """A persistent AMQP message; RabbitMQ drops it when the remaining TTL runs out. Its
        attributes are headers under their own names. A first attempt without expiry, publish
        time or attributes carries no headers (a consumer reads their absence as that)."""
        headers: dict[str, Any] = dict(self.attributes) if self.attributes else {}
        if self.attempt != 1:
            headers[ATTEMPT_HEADER] = self.attempt
        if self.published_at is not None:
            headers[PUBLISHED_AT_HEADER] = int(self.published_at * 1000)
        expiration = None
        if self.expires_at is not None:
            headers[EXPIRES_AT_HEADER] = int(self.expires_at * 1000)
            expiration = str(max(1, int((self.expires_at - now) * 1000)))  # never 0: "now"
        properties = Basic.Properties(
            message_id=self.message_id,
            headers=headers or None,
            expiration=expiration,
            delivery_mode=PERSISTENT,
            content_type=CONTENT_TYPE,
        )
        return Outgoing(self.body, properties)

    @classmethod
    def from_amqp(cls, message: aio_pika.abc.AbstractIncomingMessage) -> Envelope:
        """Read back what to_amqp wrote; tolerate messages published by other clients (their
        headers become attributes, their AMQP timestamp the publish time)."""
        headers = message.headers or {}
        expires_ms = headers.get(EXPIRES_AT_HEADER)
        attempt = headers.get(ATTEMPT_HEADER, 1)
        return cls(
            message_id=message_uuid(message.message_id),
            body=message.body,
            attempt=attempt if isinstance(attempt, int) and 1 <= attempt <= MAX_ATTEMPT else 1,
            expires_at=expires_ms / 1000 if isinstance(expires_ms, int) else None,
            attributes=attributes_of(headers) if headers else NO_ATTRIBUTES,
            published_at=published_at_of(headers, message.timestamp),
        )


def attributes_of(headers: Mapping[str, Any]) -> Mapping[str, str]:
    """The attributes among a message's headers: every one not named x-eventbus-..., as text."""
    found = {
        key: value if isinstance(value, str) else _header_text(value)
        for key, value in headers.items()
        if not key.startswith(BUS_HEADERS)
    }
    return found or NO_ATTRIBUTES


def _header_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def published_at_of(headers: Mapping[str, Any], timestamp: datetime | None) -> float | None:
    """When a message was first published (epoch seconds): the bus's header, else the AMQP
    timestamp another publisher may have set, else unknown."""
    published_ms = headers.get(PUBLISHED_AT_HEADER)
    if isinstance(published_ms, int) and not isinstance(published_ms, bool):
        return published_ms / 1000
    if isinstance(timestamp, datetime):
        aware = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
        return aware.timestamp()
    return None


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


def new_envelope(
    body: bytes,
    ttl_seconds: int,
    now: float,
    attributes: Mapping[str, str] | None = None,
    message_id: str | None = None,
) -> Envelope:
    """A fresh message, published now; ttl_seconds 0 means it never expires."""
    return Envelope(
        message_id or str(uuid.uuid4()),
        body,
        1,
        now + ttl_seconds if ttl_seconds > 0 else None,
        attributes or NO_ATTRIBUTES,
        now,
    )


@dataclass(frozen=True)
class DeliveryRecord:
    """One delivery of a message to a subscriber: the bookkeeping the republish cron acts on."""

    id: str
    message_id: str
    queue: str
    body: bytes
    attempt: int
    delivered_at: float
    deadline: float
    expires_at: float | None
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    published_at: float | None = None
    # Set: not handed out but dead-lettered for this reason (the bookkeeping keeps it so)
    dead_reason: str | None = None

    def encode(self) -> bytes:
        return encoded(self.fields(), self.body)

    def fields(self) -> dict[str, Any]:
        """Every field but the body, the optional ones only when set."""
        fields = {
            "id": self.id,
            "message_id": self.message_id,
            "queue": self.queue,
            "attempt": self.attempt,
            "delivered_at": self.delivered_at,
            "deadline": self.deadline,
            "expires_at": self.expires_at,
        }
        return optional_fields(fields, self.attributes, self.published_at, self.dead_reason)

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
        return json.dumps(vars(self), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Marker:
    """A point in the settlements queue, stamped `at` before it was published: once it is
    applied, so is every settlement confirmed before that time (the queue is applied in
    order, and a confirmed message is in the queue)."""

    at: float

    def encode(self) -> bytes:
        return json.dumps({"marker": self.at}).encode()


@dataclass(frozen=True)
class DeadlineChange(Settlement):
    """A new ack deadline (epoch seconds) for a recorded delivery, asked for at `at` (v2
    ModifyAckDeadline), outcome "deadline". It travels the settlements queue as acks do, in
    order, and settles nothing: the bookkeeping moves the delivery's deadline while it is open.
    Acks and nacks are encoded as before, without the field."""

    deadline: float


def _settlement(fields: Any) -> Settlement:
    """A settlement or deadline change from its JSON fields (TypeError when they are neither)."""
    if isinstance(fields, dict) and ("deadline" in fields or fields.get("outcome") == "deadline"):
        change = DeadlineChange(**fields)
        if change.outcome != "deadline":
            raise ValueError(f"a deadline change with outcome {change.outcome!r}")
        _time(change.deadline)
        return change
    return Settlement(**fields)


def decode_settlement(raw: bytes) -> Settlement | Marker | Packed[Settlement]:
    """A message of the settlements queue: a settlement, a marker, or several settlements
    packed (pack_settlements)."""
    fields = json.loads(raw)
    if isinstance(fields, list):
        return Packed([settlement_of(one) for one in fields])
    if isinstance(fields, dict) and set(fields) == {"marker"}:
        return Marker(_time(fields["marker"]))
    return settlement_of(fields)


def settlement_of(fields: Any) -> Settlement:
    """A settlement from its JSON fields; ValueError or TypeError when they are not one."""
    if not isinstance(fields, dict):
        raise TypeError("a settlement is not a JSON object")
    settlement = _settlement(fields)
    _time(settlement.at)
    return settlement


@dataclass(frozen=True)
class Packed(Generic[T]):
    """What one packed internal message carried: several records or settlements, in order."""

    items: list[T]


def pack_records(records: Sequence[DeliveryRecord]) -> Outgoing:
    """Delivery records as one internal message. One alone is written as DeliveryRecord.encode
    writes it; several as one line, a JSON array of their fields, each with its body's length
    as `size`, then their bodies' bytes one after another."""
    if len(records) == 1:
        return internal_message(records[0].encode())
    heads = []
    for record in records:
        fields = record.fields()
        fields["size"] = len(record.body)
        heads.append(fields)
    header = json.dumps(heads, separators=(",", ":")).encode()
    body = b"".join([header, b"\n", *(record.body for record in records)])
    return internal_message(body, rows=len(records))


def decode_records(raw: bytes) -> DeliveryRecord | Packed[DeliveryRecord]:
    """A message of the confirm queue: one delivery record, or several packed (pack_records)."""
    if not raw.startswith(b"["):
        return DeliveryRecord.decode(raw)
    header, _, bodies = raw.partition(b"\n")
    records, offset = [], 0
    for fields in json.loads(header):
        if not isinstance(fields, dict):
            raise ValueError("a packed record is not a JSON object")
        size = fields.pop("size", None)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"a packed record's size is not a length: {size!r}")
        fields["body"] = bodies[offset : offset + size]
        offset += size
        records.append(DeliveryRecord(**_checked_attributes(fields)))
    if offset != len(bodies):
        raise ValueError("a packed message's bodies are not as long as its records say")
    return Packed(records)


def pack_settlements(settlements: Sequence[Settlement]) -> Outgoing:
    """Settlements as one internal message: one alone as Settlement.encode writes it, several as
    a JSON array of their fields."""
    if len(settlements) == 1:
        return internal_message(settlements[0].encode())
    body = json.dumps([vars(s) for s in settlements], separators=(",", ":")).encode()
    return internal_message(body, rows=len(settlements))


LATEST_TIME = 1e11  # epoch seconds, in the year 5138: anything later is no clock's reading


def _time(value: Any) -> float:
    """A time stamp as epoch seconds (ValueError unless a number from 0 to LATEST_TIME, which
    PostgreSQL's to_timestamp takes)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"not a time: {value!r}")
    if not (math.isfinite(value) and 0 <= value <= LATEST_TIME):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def with_body(
    fields: dict[str, Any],
    body: bytes,
    attributes: Mapping[str, str] = NO_ATTRIBUTES,
    published_at: float | None = None,
    dead_reason: str | None = None,
) -> bytes:
    """A record for an internal queue (see encoded), the optional fields written only when
    set."""
    return encoded(optional_fields(fields, attributes, published_at, dead_reason), body)


def optional_fields(
    fields: dict[str, Any],
    attributes: Mapping[str, str],
    published_at: float | None,
    dead_reason: str | None,
) -> dict[str, Any]:
    """fields, with those of the optional ones that are set."""
    if attributes:
        fields["attributes"] = dict(attributes)
    if published_at is not None:
        fields["published_at"] = published_at
    if dead_reason is not None:
        fields["dead_reason"] = dead_reason
    return fields


def encoded(fields: dict[str, Any], body: bytes) -> bytes:
    """A record for an internal queue: its fields but the body as one line of JSON, then the
    body's bytes as they are. JSON would escape a control character into six bytes, so a body
    that fits RabbitMQ's message size as a message could otherwise not fit as a record."""
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


def without_body(raw: bytes) -> dict[str, Any]:
    """The fields with_body wrote, the body as bytes; also reads a record written as one JSON
    object, body inside as text (as the bus wrote them before)."""
    header, _, body = raw.partition(b"\n")
    fields: dict[str, Any] = json.loads(header)
    if not isinstance(fields, dict):
        raise ValueError("a record's first line is not a JSON object")
    inside = fields.get("body")
    if inside is None:
        fields["body"] = body
    elif isinstance(inside, str):
        fields["body"] = inside.encode()
    else:
        raise ValueError("a record's body is not text")
    return _checked_attributes(fields)


def _checked_attributes(fields: dict[str, Any]) -> dict[str, Any]:
    attributes = fields.get("attributes")
    if attributes is not None and not _text_mapping(attributes):
        raise ValueError("a record's attributes are not a JSON object of strings")
    return fields


def _text_mapping(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def internal_message(body: bytes, rows: int = 1) -> Outgoing:
    """A persistent message for the bus's own queues; rows > 1: a packed message of that many
    records or settlements, so named in a header (the bookkeeping sizes its batches by it)."""
    properties = Basic.Properties(
        message_id=uuid.uuid4().hex,  # RabbitMQ names a returned message by it
        delivery_mode=PERSISTENT,
        content_type="application/json",
        headers={ROWS_HEADER: rows} if rows > 1 else None,
    )
    return Outgoing(body, properties)


@dataclass(frozen=True)
class DelayedMessage:
    """A message to publish later to a queue or a topic; its id becomes the message id, unless it
    is the retry of a message published before (message_id)."""

    id: str
    kind: Kind
    target: str
    body: bytes
    due_at: float  # epoch seconds
    ttl_seconds: int  # counted from when it reaches its queue; 0 never expires
    attributes: Mapping[str, str] = field(default_factory=no_attributes)
    attempt: int = 1  # a retry waiting here keeps its attempt
    published_at: float | None = None  # None: when it reaches its queue
    message_id: str | None = None  # a retry's message, published before; None: id

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "target": self.target,
            "due_at": self.due_at,
            "ttl_seconds": self.ttl_seconds,
        }
        if self.attempt != 1:
            fields["attempt"] = self.attempt
        if self.message_id is not None:
            fields["message_id"] = self.message_id
        return with_body(fields, self.body, self.attributes, self.published_at)

    @classmethod
    def decode(cls, raw: bytes) -> DelayedMessage:
        return cls(**without_body(raw))

    def envelope(self, now: float) -> Envelope:
        """The message as it is published when due."""
        expires_at = now + self.ttl_seconds if self.ttl_seconds > 0 else None
        published_at = now if self.published_at is None else self.published_at
        message_id = self.message_id or self.id
        return Envelope(
            message_id, self.body, self.attempt, expires_at, self.attributes, published_at
        )
