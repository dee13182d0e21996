"""Noticing a blocked event loop: every task of the daemon shares one thread, so a callback that
runs too long delays every call, health check and heartbeat. The lag is a gauge in /metrics and
a warning line when it passes WARN_SECONDS."""

from __future__ import annotations

import logging

import trio

from .metrics import Metrics

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.5
WARN_SECONDS = 1.0


async def watch(metrics: Metrics) -> None:
    """Sleep INTERVAL_SECONDS again and again, forever; how much later than asked each sleep
    ends is the loop's lag."""
    while True:
        asked_until = trio.current_time() + INTERVAL_SECONDS
        await trio.sleep_until(asked_until)
        lag = max(0.0, trio.current_time() - asked_until)
        metrics.loop_lag.set(lag)
        if lag > WARN_SECONDS:
            logger.warning("event loop: blocked for %.1f s; every call waited that long", lag)
