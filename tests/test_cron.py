"""The consumer's local Buffer and the Cron ticker, on trio's mock clock."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

import pytest
import trio
import trio.testing

from eventbus.backends.lock import RedisLock
from eventbus.jobs.cron import Cron


class FakeLock:
    """Stands in for RedisLock: grants or refuses, or fails like an unreachable Redis."""

    def __init__(self, grants: bool = True, error: Exception | None = None) -> None:
        self.grants = grants
        self.error = error
        self.holds: list[float] = []
        self.releases: list[float] = []

    def trouble(self) -> str | None:
        return None  # never known slow ahead of a call (tests/test_redis_hang.py covers that)

    async def hold(self) -> bool:
        self.holds.append(trio.current_time())
        if self.error is not None:
            raise self.error
        return self.grants

    async def release(self) -> None:
        self.releases.append(trio.current_time())


class RecordingJob:
    """Records when each run starts; optionally lasts a while or fails."""

    def __init__(
        self,
        duration: float = 0.0,
        fail: Callable[[int], bool] = lambda n: False,
        again_in: float | None = None,
    ) -> None:
        self.duration = duration
        self.fail = fail
        self.again_in = again_in
        self.runs: list[float] = []

    async def __call__(self) -> float | None:
        self.runs.append(trio.current_time())
        if self.duration:
            await trio.sleep(self.duration)
        if self.fail(len(self.runs)):
            raise RuntimeError(f"run {len(self.runs)} failed")
        return self.again_in


async def run_cron(
    job: RecordingJob,
    lock: FakeLock,
    seconds: float,
    *,
    interval: float = 1.0,
    lock_ttl: float = 30.0,
) -> float:
    """Run a Cron for seconds of (mock) time; returns when it started."""
    cron = Cron("test-job", job, cast(RedisLock, lock), interval, lock_ttl)
    start = trio.current_time()
    with trio.move_on_after(seconds):
        await cron.run()
    return start


def since(start: float, times: list[float]) -> list[float]:
    return [t - start for t in times]


async def test_cron_ticks_once_per_interval_while_holding_the_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(), FakeLock(grants=True)
    start = await run_cron(job, lock, 5.5)
    assert since(start, job.runs) == pytest.approx([0, 1, 2, 3, 4, 5])


async def test_cron_interval_is_measured_from_tick_start_not_job_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(duration=0.4), FakeLock(grants=True)
    start = await run_cron(job, lock, 3.5)
    assert since(start, job.runs) == pytest.approx([0, 1, 2, 3])


async def test_a_job_that_asks_to_run_sooner_than_the_next_tick_runs_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(duration=0.1, again_in=0.25), FakeLock(grants=True)
    start = await run_cron(job, lock, 1.0)
    assert since(start, job.runs) == pytest.approx([0, 0.35, 0.7])


async def test_a_job_that_asks_for_later_than_the_next_tick_still_runs_each_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(again_in=5.0), FakeLock(grants=True)
    start = await run_cron(job, lock, 2.5)
    assert since(start, job.runs) == pytest.approx([0, 1, 2])


async def test_a_job_that_asks_to_run_at_once_waits_the_shortest_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(again_in=-3.0), FakeLock(grants=True)
    start = await run_cron(job, lock, 0.175)
    assert since(start, job.runs) == pytest.approx([0, 0.05, 0.1, 0.15])


async def test_cron_runs_nothing_when_the_lock_is_never_granted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(), FakeLock(grants=False)
    start = await run_cron(job, lock, 5.5)
    assert job.runs == []
    assert since(start, lock.holds) == pytest.approx([0, 1, 2, 3, 4, 5])  # still tries each tick
    assert lock.releases == []


async def test_cron_runs_on_row_claims_alone_when_redis_is_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="eventbus.jobs.cron")
    job, lock = RecordingJob(), FakeLock(error=ConnectionError("Connection refused"))
    start = await run_cron(job, lock, 5.5)
    assert since(start, job.runs) == pytest.approx([0, 1, 2, 3, 4, 5])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Redis unreachable" in warnings[0].getMessage()
    assert "ConnectionError: Connection refused" in warnings[0].getMessage()
    assert lock.releases == []  # nothing was held, so nothing to give up


async def test_cron_logs_redis_back_and_warns_again_on_the_next_outage(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventbus.jobs.cron")
    lock = FakeLock(error=ConnectionError("down"))
    job = RecordingJob()

    async def flip_redis() -> None:
        await trio.sleep(2.5)
        lock.error = None
        await trio.sleep(2)
        lock.error = ConnectionError("down again")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flip_redis)
        await run_cron(job, lock, 6.5)
    messages = [
        (r.levelno, r.getMessage()) for r in caplog.records if r.name == "eventbus.jobs.cron"
    ]
    assert [level for level, _ in messages] == [logging.WARNING, logging.INFO, logging.WARNING]
    assert "Redis is back" in messages[1][1]
    assert len(job.runs) == 7


async def test_cron_releases_the_lock_after_each_tick_that_held_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(duration=0.25), FakeLock(grants=True)
    start = await run_cron(job, lock, 3.5)
    assert since(start, lock.releases) == pytest.approx([0.25, 1.25, 2.25, 3.25])


async def test_cron_releases_the_lock_only_after_ticks_it_won(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = FakeLock(grants=True)
    job = RecordingJob()

    async def refuse_for_a_while() -> None:
        await trio.sleep(0.5)
        lock.grants = False
        await trio.sleep(2)
        lock.grants = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse_for_a_while)
        start = await run_cron(job, lock, 4.5)
    assert since(start, job.runs) == pytest.approx([0, 3, 4])
    assert since(start, lock.releases) == pytest.approx([0, 3, 4])


async def test_cron_job_failure_skips_only_that_tick(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="eventbus.jobs.cron")
    job, lock = RecordingJob(fail=lambda n: n in (1, 3)), FakeLock(grants=True)
    start = await run_cron(job, lock, 4.5)
    assert since(start, job.runs) == pytest.approx([0, 1, 2, 3, 4])
    assert len(lock.releases) == 5  # released after the failed ticks too
    skipped = [r.getMessage() for r in caplog.records if "tick skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert "RuntimeError: run 1 failed" in skipped[0]


async def test_cron_renews_the_lock_during_a_long_job(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lock_ttl 3 s: renewed every 1 s while held; the job lasts 2.5 s of a 10 s interval.
    job, lock = RecordingJob(duration=2.5), FakeLock(grants=True)
    start = await run_cron(job, lock, 5.0, interval=10.0, lock_ttl=3.0)
    assert since(start, job.runs) == pytest.approx([0])
    assert since(start, lock.holds) == pytest.approx([0, 1, 2])  # the tick's hold, two renewals
    assert since(start, lock.releases) == pytest.approx([2.5])


async def test_cron_does_not_renew_between_ticks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job, lock = RecordingJob(duration=0.1), FakeLock(grants=True)
    start = await run_cron(job, lock, 9.5, interval=10.0, lock_ttl=0.6)
    assert since(start, lock.holds) == pytest.approx([0])
    assert since(start, lock.releases) == pytest.approx([0.1])


class SlowLock:
    """A lock whose every call to Redis takes half a second."""

    def __init__(self) -> None:
        self.holds: list[float] = []
        self.releases: list[float] = []

    def trouble(self) -> str | None:
        return None

    async def hold(self) -> bool:
        self.holds.append(trio.current_time())
        await trio.sleep(0.5)
        return True

    async def release(self) -> None:
        self.releases.append(trio.current_time())


async def test_lock_is_not_held_between_ticks_when_a_renewal_overlaps_the_release(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = SlowLock()

    async def job() -> None:
        await trio.sleep(0.7)  # hold 0-0.5, job 0.5-1.2; a renewal starts at 1.0

    cron = Cron("race", job, cast(RedisLock, lock), 10.0, 3.0)  # renews every 1 s
    start = trio.current_time()
    with trio.move_on_after(9.0):
        await cron.run()
    assert [r - start for r in lock.releases] == pytest.approx([1.2])
    assert [h - start for h in lock.holds if h - start > 1.2] == []
