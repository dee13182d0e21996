"""Checks on what clients send, as plain functions: each raises InvalidArgument naming the field."""

from __future__ import annotations

import uuid

from .errors import InvalidArgument

MAX_NAME_BYTES = 255
MAX_DELAY_SECONDS = 365 * 24 * 3600


def name(field: str, value: str, namespace: str) -> str:
    """A queue, topic or queue-group name: non-empty, at most 255 bytes, not reserved."""
    if not value:
        raise InvalidArgument(f"{field} must not be empty")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field} must be at most {MAX_NAME_BYTES} bytes")
    if value.startswith("amq."):
        raise InvalidArgument(f"{field} must not start with 'amq.' (reserved by RabbitMQ)")
    if value == namespace or value.startswith(namespace + "."):
        raise InvalidArgument(f"{field} must not be inside the bus's namespace {namespace!r}")
    return value


def data(value: str) -> str:
    if not value:
        raise InvalidArgument("data must not be empty")
    return value


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
    """A delayPublish delay: at most maximum seconds (delivery.max_delay_seconds)."""
    if seconds > maximum:
        raise InvalidArgument(f"delaySeconds must be at most {maximum}")
    return seconds
