"""When a broken subscriber stream is opened again, and after how long: pure decisions."""

from __future__ import annotations

import random

from grpclib.const import Status

# A stream ending with one of these is opened again after a backoff: the daemon restarting or
# overloaded, a connection lost, a bug on the server side that may pass. Any other status
# (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, UNIMPLEMENTED,
# FAILED_PRECONDITION, ...) is a mistake that retrying cannot fix: the subscription ends with it.
RETRYABLE = frozenset(
    {
        Status.UNAVAILABLE,
        Status.INTERNAL,
        Status.UNKNOWN,
        Status.DEADLINE_EXCEEDED,
        Status.RESOURCE_EXHAUSTED,
        Status.ABORTED,
        Status.CANCELLED,
    }
)


def is_retryable(status: Status) -> bool:
    """Whether a stream that ended with this status is opened again."""
    return status in RETRYABLE


def backoff_delay(
    failures: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after the `failures`-th failure in a row (1, 2, ...): initial * 2^(n-1),
    capped at maximum, of which a random half is taken off ("equal jitter"), so that many
    subscribers cut off together do not all come back at the same instant."""
    ceiling = min(maximum, initial * 2.0 ** min(failures - 1, 62))
    return ceiling * (0.5 + (rng or random).uniform(0.0, 0.5))
