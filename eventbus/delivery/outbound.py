"""A v2 publish batch, checked whole before anything of it is stored (plain code, no I/O).

Each message is checked against what the engines below take: names as RabbitMQ's client library
accepts them, attributes small enough to fit one AMQP content-header frame (a larger one would
close the publishing connection, and every other sender's messages on it), no NUL character
where PostgreSQL stores text (dedup ids, attributes of delayed messages and dead letters).
The first mistake makes the whole call INVALID_ARGUMENT, naming the message's index and field.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import InvalidArgument
from . import validate
from .envelope import Kind

MAX_BATCH = 1000
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 128  # pamqp cuts a longer header name down to 128 bytes
# RabbitMQ's smallest frame_max is 4 KiB and its default 128 KiB: the properties of a message,
# attributes included, travel in one frame.
MAX_ATTRIBUTE_BYTES = 32 * 1024
MAX_DEDUP_ID_BYTES = 256
RESERVED_PREFIX = "x-eventbus-"


class Outbound(Protocol):
    """What a v2 OutboundMessage offers (the generated protobuf class)."""

    queue: str
    topic: str
    data: bytes
    ttl_seconds: int
    delay_seconds: int
    dedup_id: str

    @property
    def attributes(self) -> Mapping[str, str]: ...


@dataclass
class Prepared:
    """One checked message of a batch, with the id it is stored under."""

    index: int
    kind: Kind
    target: str
    data: bytes
    attributes: dict[str, str]
    ttl_seconds: int
    delay_seconds: int
    dedup_id: str
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    duplicate: bool = False

    @property
    def scope(self) -> str:
        """What a dedup id is unique within: its queue or its topic."""
        return f"{self.kind}:{self.target}"


@dataclass(frozen=True)
class Limits:
    namespace: str
    max_delay_seconds: int


def prepare(messages: Sequence[Outbound], limits: Limits) -> list[Prepared]:
    """The batch, checked; InvalidArgument naming the first mistake."""
    if not messages:
        raise InvalidArgument("messages must not be empty")
    if len(messages) > MAX_BATCH:
        raise InvalidArgument(f"a batch carries at most {MAX_BATCH} messages, got {len(messages)}")
    return [_prepare_one(i, message, limits) for i, message in enumerate(messages)]


def _prepare_one(index: int, message: Outbound, limits: Limits) -> Prepared:
    where = f"messages[{index}]"
    kind, target = _target(where, message, limits.namespace)
    if not message.data and not message.attributes:
        raise InvalidArgument(f"{where}: data and attributes must not both be empty")
    if not 0 <= message.ttl_seconds <= validate.MAX_TTL_SECONDS:
        raise InvalidArgument(f"{where}.ttl_seconds: must be 0-{validate.MAX_TTL_SECONDS}")
    if not 0 <= message.delay_seconds <= limits.max_delay_seconds:
        raise InvalidArgument(
            f"{where}.delay_seconds: must be 0-{limits.max_delay_seconds} "
            "(delivery.max_delay_seconds)"
        )
    return Prepared(
        index,
        kind,
        target,
        message.data,
        _attributes(where, message.attributes),
        message.ttl_seconds,
        message.delay_seconds,
        _dedup_id(where, message.dedup_id),
    )


def _target(where: str, message: Outbound, namespace: str) -> tuple[Kind, str]:
    if message.queue and message.topic:
        raise InvalidArgument(f"{where}: set queue or topic, not both")
    if message.topic:
        return "topic", validate.name(f"{where}.topic", message.topic, namespace)
    return "queue", validate.name(f"{where}.queue", message.queue, namespace)


def _attributes(where: str, attributes: Mapping[str, str]) -> dict[str, str]:
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidArgument(f"{where}.attributes: at most {MAX_ATTRIBUTES} entries")
    size = 0
    for key, value in attributes.items():
        _attribute_key(where, key)
        if "\x00" in value:
            raise InvalidArgument(f"{where}.attributes[{key!r}]: must not contain NUL")
        size += len(key.encode()) + len(value.encode())
    if size > MAX_ATTRIBUTE_BYTES:
        raise InvalidArgument(f"{where}.attributes: at most {MAX_ATTRIBUTE_BYTES} bytes in all")
    return dict(attributes)


def _attribute_key(where: str, key: str) -> None:
    if not key or len(key.encode()) > MAX_ATTRIBUTE_KEY_BYTES:
        raise InvalidArgument(
            f"{where}.attributes: a key must be 1-{MAX_ATTRIBUTE_KEY_BYTES} bytes, got {key[:64]!r}"
        )
    if not key.isprintable():
        raise InvalidArgument(f"{where}.attributes: key {key[:64]!r} has unprintable characters")
    if key.lower().startswith(RESERVED_PREFIX):
        raise InvalidArgument(
            f"{where}.attributes: key {key[:64]!r} is reserved (prefix {RESERVED_PREFIX!r})"
        )


def _dedup_id(where: str, dedup_id: str) -> str:
    if len(dedup_id.encode()) > MAX_DEDUP_ID_BYTES:
        raise InvalidArgument(f"{where}.dedup_id: at most {MAX_DEDUP_ID_BYTES} bytes")
    if dedup_id and not dedup_id.isprintable():
        raise InvalidArgument(f"{where}.dedup_id: must be printable text")
    return dedup_id
