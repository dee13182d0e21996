"""Log lines that a client can trigger at will, limited to one line per kind per interval.

A hostile or careless client can make the same thing happen thousands of times a second (a
refused name, a dropped connection); the log says it once per interval with how many more
occurrences there were, instead of one line per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

INTERVAL_SECONDS = 60.0
MAX_KINDS = 1000  # kinds remembered at once; the oldest is forgotten first


class RateLimitedLog:
    """One logger's rate limit: at most one line per kind every interval seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (logged at, suppressed since)

    def log(
        self,
        level: int,
        kind: str,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Log message (%-style args, with exc_info's traceback if given) unless a line of this
        kind went out within the interval; returns whether it was logged. A logged line says
        how many were suppressed before it."""
        now = self._clock()
        logged_at, suppressed = self._last.pop(kind, (-self._interval, 0))
        if now - logged_at < self._interval:
            self._remember(kind, logged_at, suppressed + 1)
            return False
        if suppressed:
            message += " (%d more like it in the last %.0f s)"
            args = (*args, suppressed, now - logged_at)
        self._logger.log(level, message, *args, exc_info=exc_info)
        self._remember(kind, now, 0)
        return True

    def _remember(self, kind: str, logged_at: float, suppressed: int) -> None:
        if len(self._last) >= MAX_KINDS:
            del self._last[next(iter(self._last))]
        self._last[kind] = (logged_at, suppressed)

    def warning(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.ERROR, kind, message, *args)

    def info(self, kind: str, message: str, *args: object) -> bool:
        return self.log(logging.INFO, kind, message, *args)
