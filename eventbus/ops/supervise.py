"""Supervision of the daemon's long-lived tasks: a task that fails is logged, counted and
started again with back-off, without touching the tasks beside it; only the documented conditions
(FatalError: a dependency gone past its window) end the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..backends.retry import describe
from ..errors import FatalError
from .metrics import Metrics
from .ratelog import RateLimitedLog

logger = logging.getLogger(__name__)

FIRST_PAUSE = 1.0
MAX_PAUSE = 30.0
HEALTHY_AFTER = 60.0  # a run this long resets the back-off


class Supervisor:
    """Runs parts of the daemon forever, restarting each after a failure."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._log = RateLimitedLog(logger)

    async def forever(self, what: str, part: Callable[[], Awaitable[object]]) -> None:
        """Run part until it returns, starting it again after each failure with back-off
        (FIRST_PAUSE doubling up to MAX_PAUSE). FatalError and cancellation pass through."""
        pause = FIRST_PAUSE
        while True:
            started = trio.current_time()
            try:
                await part()
                return
            except FatalError:
                raise
            except Exception as error:
                self.failed(what, error)
            if trio.current_time() - started > HEALTHY_AFTER:
                pause = FIRST_PAUSE
            await trio.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)

    def failed(self, what: str, error: BaseException, *, subject: str = "") -> None:
        """Count a failure of part what (of subject, a queue say) and log it with its
        traceback, at most once a minute for the same part and error type."""
        self._metrics.task_failures.labels(what).inc()
        self._log.log(
            logging.ERROR,
            f"{what}: {type(error).__name__}",
            "%s failed: %s; starting it again",
            f"{what} {subject}" if subject else what,
            describe(error),
            exc_info=error,
        )
