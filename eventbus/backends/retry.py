"""Connecting to a dependency within a window: one warning line per failed attempt."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import trio

from ..errors import DependencyUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY = 0.2
MAX_DELAY = 5.0
ATTEMPT_TIMEOUT = 5.0


async def connect_within(
    name: str,
    address: str,
    connect: Callable[[], Awaitable[T]],
    window: float,
    transient: tuple[type[BaseException], ...],
    attempt_timeout: float = ATTEMPT_TIMEOUT,
) -> T:
    """Call connect until it succeeds, retrying only transient errors, for at most window seconds,
    each attempt for at most attempt_timeout (one that walks several hosts needs more).

    Waits on connect and on the back-off sleeps between attempts. Raises DependencyUnavailable,
    naming the dependency and its address, once the window has passed.
    """
    retryable: tuple[type[BaseException], ...] = (*transient, trio.TooSlowError)
    give_up_at = trio.current_time() + window
    delay = FIRST_DELAY
    attempt = 0
    while True:
        attempt += 1
        left = give_up_at - trio.current_time()
        try:
            with trio.fail_after(max(0.1, min(attempt_timeout, left))):
                return await connect()
        except retryable as error:
            reason = describe(error)
        left = give_up_at - trio.current_time()
        if left <= 0:
            raise DependencyUnavailable(
                f"{name} at {address} did not answer within {window:g} s: {reason}"
            )
        pause = min(delay, left)
        logger.warning(
            "%s at %s: %s (attempt %d); retrying in %.1f s", name, address, reason, attempt, pause
        )
        await trio.sleep(pause)
        delay = min(delay * 2, MAX_DELAY)


async def keep_running(
    what: str,
    part: Callable[[], Awaitable[None]],
    errors: tuple[type[BaseException], ...],
    pause: float = 1.0,
) -> None:
    """Run part again and again, forever: an expected error is one warning line, and every
    end is followed by a pause before the next start."""
    while True:
        try:
            await part()
        except errors as error:
            logger.warning("%s: %s; starting again", what, describe(error))
        await trio.sleep(pause)


def describe(error: BaseException) -> str:
    """A short, one-line account of a connection error."""
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(sorted({describe(inner) for inner in error.exceptions}))
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


SECRET_PARAMETERS = {"password", "sslpassword"}  # asyncpg and redis-py take them in the query


def redact(url: str) -> str:
    """The URL without its password (in the address or the query), fit for logs and error
    lines."""
    parts = urlsplit(url)
    if parts.password is not None:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if any(k.lower() in SECRET_PARAMETERS for k, _ in pairs):
        hidden = [(k, "***" if k.lower() in SECRET_PARAMETERS else v) for k, v in pairs]
        parts = parts._replace(query=urlencode(hidden, safe="/*"))
    return urlunsplit(parts)
