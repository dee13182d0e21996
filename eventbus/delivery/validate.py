"""Checks on what clients send, as plain functions: each raises InvalidArgument naming the field
and the limit. The limits are those of the engines below: what RabbitMQ and its client library
(pamqp) accept as a name, what RabbitMQ accepts as a message expiration, and what PostgreSQL
stores as a timestamp."""

from __future__ import annotations

import re
import uuid

from ..errors import InvalidArgument

MAX_NAME_BYTES = 255  # an AMQP short string
# pamqp refuses any other character in a queue or exchange name (and RabbitMQ's own UTF-8 names
# beyond ASCII with it); checked here with fullmatch, which, unlike pamqp's `$`, also refuses a
# trailing newline.
NAME_CHARACTERS = "A-Z a-z 0-9 - _ . : @ # , / + and space"
NAME_PATTERN = re.compile(r"[A-Za-z0-9\-_.:@#,/+ ]+")
# RabbitMQ refuses a per-message expiration over ten years (its MAX_EXPIRY_TIMER, in ms).
MAX_TTL_SECONDS = 3650 * 24 * 3600
MAX_DELAY_SECONDS = 365 * 24 * 3600


def name(field: str, value: str, namespace: str) -> str:
    """A queue, topic or queue-group name: 1-255 of the characters RabbitMQ's client library
    accepts, not reserved by RabbitMQ or by the bus."""
    if not value:
        raise InvalidArgument(f"{field} must not be empty")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field} must be at most {MAX_NAME_BYTES} bytes")
    if not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain {NAME_CHARACTERS}, got {value[:64]!r}")
    if value.startswith("amq."):
        raise InvalidArgument(f"{field} must not start with 'amq.' (reserved by RabbitMQ)")
    if value == namespace or value.startswith(namespace + "."):
        raise InvalidArgument(f"{field} must not be inside the bus's namespace {namespace!r}")
    return value


def data(value: str) -> str:
    if not value:
        raise InvalidArgument("data must not be empty")
    return value


def ttl(seconds: int) -> int:
    """ExpirationSeconds: 0 (never expires) up to the ten years RabbitMQ accepts."""
    if not 0 <= seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(f"ExpirationSeconds must be 0-{MAX_TTL_SECONDS} (ten years)")
    return seconds


def delivery_id(value: str) -> str:
    """A delivery id as handed out by subscribe: a UUID in canonical form."""
    if not value:
        raise InvalidArgument("id must not be empty")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"id {value[:64]!r} is not a delivery id") from None
    if str(parsed) != value.lower():
        raise InvalidArgument(f"id {value[:64]!r} is not a delivery id")
    return str(parsed)


def delay(seconds: int, maximum: int = MAX_DELAY_SECONDS) -> int:
    """A delayPublish delay: 0 up to maximum seconds (delivery.max_delay_seconds)."""
    if not 0 <= seconds <= maximum:
        raise InvalidArgument(f"delaySeconds must be 0-{maximum} (delivery.max_delay_seconds)")
    return seconds
