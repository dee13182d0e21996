"""Supervision of background tasks, on trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from eventbus.errors import FatalError
from eventbus.ops.metrics import Metrics, label_values
from eventbus.ops.supervise import Supervisor


class FlakyPart:
    """Fails with the given errors in turn, then runs until cancelled."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.starts: list[float] = []

    async def __call__(self) -> None:
        self.starts.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        await trio.sleep_forever()


async def test_a_failing_task_is_counted_and_restarted_with_growing_pauses(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics("n")
    part = FlakyPart(ValueError("bad"), KeyError("k"), ValueError("bad again"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Supervisor(metrics).forever, "consumer q", part)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert [round(t - part.starts[0]) for t in part.starts] == [0, 1, 3, 7]
    assert label_values(metrics.task_failures) == {"consumer q": 3}
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    # the same part and error type is logged once a minute, with its traceback
    assert [r.getMessage() for r in errors] == [
        "consumer q failed: ValueError: bad; starting it again",
        "consumer q failed: KeyError: 'k'; starting it again",
    ]
    assert all(r.exc_info for r in errors)


async def test_a_task_that_returns_is_done(autojump_clock: trio.testing.MockClock) -> None:
    part = FlakyPart(ValueError("once"))

    async def finish_after_one_failure() -> None:
        if not part.starts:
            await part()
        part.starts.append(trio.current_time())

    with trio.fail_after(60):
        await Supervisor(Metrics("n")).forever("registration", finish_after_one_failure)
    assert len(part.starts) == 2


async def test_a_fatal_error_ends_supervision(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.RaisesGroup(FatalError):
        async with trio.open_nursery() as nursery:
            part = FlakyPart(FatalError("RabbitMQ gone"))
            nursery.start_soon(Supervisor(Metrics("n")).forever, "broker", part)
