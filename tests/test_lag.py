"""The loop-lag watcher, on trio's MockClock: a blocked loop shows in the gauge and the log."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from eventbus.ops import lag
from eventbus.ops.metrics import Metrics


async def test_a_blocked_loop_is_measured_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.watch, metrics)
        await trio.sleep(2)
        assert metrics.loop_lag._value.get() == 0
        assert "blocked" not in caplog.text

        await trio.sleep(lag.INTERVAL_SECONDS / 2)
        autojump_clock.jump(3)  # as if one callback had held the thread for 3 s
        await trio.sleep(lag.INTERVAL_SECONDS / 4)
        assert metrics.loop_lag._value.get() == pytest.approx(3 - lag.INTERVAL_SECONDS / 2)
        assert "event loop: blocked for" in caplog.text

        await trio.sleep(2)
        assert metrics.loop_lag._value.get() == 0  # back to normal
        nursery.cancel_scope.cancel()


async def test_a_short_delay_is_measured_but_not_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    metrics = Metrics("test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.watch, metrics)
        await trio.sleep(lag.INTERVAL_SECONDS / 2)
        autojump_clock.jump(0.75)
        await trio.sleep(lag.INTERVAL_SECONDS / 4)
        assert metrics.loop_lag._value.get() == pytest.approx(0.75 - lag.INTERVAL_SECONDS / 2)
        assert caplog.text == ""
        nursery.cancel_scope.cancel()
