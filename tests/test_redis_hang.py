"""A Redis that hangs (paused, not refusing) or refuses: the crons run on row claims at once, the
lock's calls cost at most the lock timeout, a probe in the background finds Redis again.

The cron logic runs on trio's mock clock against a fake Redis client; the last test pauses the
real Redis under a real daemon (CLIENT PAUSE pauses every client of that Redis, so it is marked
slow and kept short; it always unpauses).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import trio
import trio.testing

from eventbus.backends.lock import (
    HOLD,
    PROBE,
    PROBE_INTERVAL,
    RELEASE,
    Redis,
    RedisHealth,
    RedisLock,
)
from eventbus.config import Config, ConfigError, load
from eventbus.jobs.cron import Cron
from tests.bus_client import BusClient
from tests.servers import REDIS_URL
from tests.test_cron import RecordingJob, since

TIMEOUT = 0.25


class FakeRedis:
    """Stands in for lock.Redis: answers at once, hangs while paused, or refuses."""

    def __init__(self) -> None:
        self.key_prefix = "test:"
        self.health = RedisHealth(TIMEOUT)
        self.paused = False
        self.refusing = False
        self.calls: list[tuple[float, str]] = []

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        names = {HOLD: "hold", RELEASE: "release", PROBE: "probe"}
        self.calls.append((trio.current_time(), names[script]))
        if self.refusing:
            raise ConnectionRefusedError("Connection refused")
        if self.paused:
            await trio.sleep_forever()
        return 1

    async def probe(self) -> None:
        await self.eval(PROBE, [], [])

    def times_of(self, name: str, start: float) -> list[float]:
        return [t - start for t, call in self.calls if call == name]


async def run_crons(
    fake: FakeRedis,
    jobs: dict[str, RecordingJob],
    seconds: float,
    *,
    interval: float = 1.0,
    lock_ttl: float = 30.0,
) -> float:
    """Run a Cron per job on a lock of fake, and fake's probe, for seconds of (mock) time."""
    start = trio.current_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.health.watch, fake.probe)
            for name, job in jobs.items():
                lock = RedisLock(cast(Redis, fake), name, lock_ttl)
                nursery.start_soon(Cron(name, job, lock, interval, lock_ttl).run)
    return start


async def at(seconds: float, action: Any) -> None:
    await trio.sleep(seconds)
    action()


async def test_a_hung_redis_costs_one_lock_timeout_then_ticks_run_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRedis()
    fake.paused = True
    republish, delay = RecordingJob(), RecordingJob()
    start = await run_crons(fake, {"republish": republish, "delay": delay}, 5.5)
    assert since(start, republish.runs) == pytest.approx([TIMEOUT, 1, 2, 3, 4, 5])
    assert since(start, delay.runs) == pytest.approx([TIMEOUT, 1, 2, 3, 4, 5])
    assert fake.times_of("hold", start) == pytest.approx([0, 0])  # the first ticks only
    # only when they stop: a hold that timed out may have taken the lock, and a restarted node
    # (another token) could not give it up
    assert fake.times_of("release", start) == pytest.approx([5.5, 5.5])
    assert fake.health.state == "degraded"
    assert fake.health.reason == f"no answer within {TIMEOUT:g} s"


async def test_the_probe_runs_beside_the_ticks_until_redis_answers_then_the_lock_is_used_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventbus")
    fake = FakeRedis()
    job = RecordingJob()

    def unpause() -> None:
        fake.paused = False

    async with trio.open_nursery() as nursery:
        fake.paused = True
        nursery.start_soon(at, 3.1, unpause)
        start = await run_crons(fake, {"delay": job}, 5.5)
    assert since(start, job.runs) == pytest.approx([TIMEOUT, 1, 2, 3, 4, 5])
    # Probes every PROBE_INTERVAL after the last failure, each failing at the timeout, until
    # one is answered (at 3.75).
    step = PROBE_INTERVAL + TIMEOUT
    probes = [TIMEOUT + PROBE_INTERVAL + n * step for n in range(5)]
    assert fake.times_of("probe", start) == pytest.approx(probes)
    assert fake.health.ok
    # Back to the lock from the first tick after that.
    assert fake.times_of("hold", start) == pytest.approx([0, 4, 5])
    assert fake.times_of("release", start) == pytest.approx([4, 5])
    messages = [r.getMessage() for r in caplog.records]
    assert any("Redis: degraded (no answer within 0.25 s)" in m for m in messages)
    assert any("Redis: answers within 0.25 s again" in m for m in messages)
    assert any("cron delay: Redis is back" in m for m in messages)


async def test_a_renewal_that_hangs_never_delays_the_tick_nor_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # lock_ttl 0.6 s: renewed every 0.2 s; Redis hangs 0.3 s into a 1 s job.
    fake = FakeRedis()
    job = RecordingJob(duration=1.0)

    def pause() -> None:
        fake.paused = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(at, 0.3, pause)
        start = await run_crons(fake, {"delay": job}, 4.5, interval=1.5, lock_ttl=0.6)
    assert since(start, job.runs) == pytest.approx([0, 1.5, 3.0])
    assert fake.times_of("hold", start) == pytest.approx([0, 0.2, 0.4])  # the last one hung
    # not tried once Redis is known to hang, only when the cron stops
    assert fake.times_of("release", start) == pytest.approx([4.5])


async def test_a_release_that_hangs_delays_the_next_tick_by_the_lock_timeout_at_most(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRedis()
    runs: list[float] = []

    async def job() -> None:
        runs.append(trio.current_time())
        await trio.sleep(0.1)
        fake.paused = True  # just before the release

    cron = Cron("delay", job, RedisLock(cast(Redis, fake), "delay", 30.0), 0.2, 30.0)
    start = trio.current_time()
    with trio.move_on_after(1.0):
        await cron.run()
    assert fake.times_of("release", start) == pytest.approx([0.1, 1.0])  # and when it stops
    assert since(start, runs) == pytest.approx([0, 0.1 + TIMEOUT, 0.55, 0.75, 0.95])
    assert fake.times_of("hold", start) == pytest.approx([0])
    assert fake.health.state == "degraded"


async def test_a_job_that_asks_to_run_soon_still_does_while_redis_hangs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRedis()
    fake.paused = True
    job = RecordingJob(again_in=0.3)  # the next delayed message falls due in 0.3 s
    start = await run_crons(fake, {"delay": job}, 1.5)
    assert since(start, job.runs) == pytest.approx([TIMEOUT, 0.55, 0.85, 1.15, 1.45])


async def test_a_refusing_redis_is_down_and_the_ticks_do_not_wait_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRedis()
    fake.refusing = True
    job = RecordingJob()
    before = datetime.now(UTC)
    start = await run_crons(fake, {"delay": job}, 3.25)
    assert since(start, job.runs) == pytest.approx([0, 1, 2, 3])
    assert fake.times_of("hold", start) == pytest.approx([0])
    assert fake.times_of("probe", start) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    stats = fake.health.as_dict()
    assert stats["state"] == "down"
    assert stats["reason"] == "ConnectionRefusedError: Connection refused"
    assert datetime.fromisoformat(stats["since"]) >= before - timedelta(seconds=0.01)
    trouble = fake.health.trouble()
    assert trouble is not None and trouble.startswith("down since ")


async def test_a_redis_that_turns_from_slow_to_refusing_is_down_since_then(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeRedis()
    fake.paused = True

    def refuse() -> None:
        fake.refusing = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(at, 1.0, refuse)
        await run_crons(fake, {"delay": RecordingJob()}, 2.0)
    assert fake.health.state == "down"
    assert fake.health.trouble() is not None


def test_the_lock_timeout_is_a_redis_key_with_a_short_default(tmp_path: Path) -> None:
    assert Config().redis.lock_timeout_seconds == TIMEOUT
    path = tmp_path / "config.toml"
    path.write_text("[redis]\nlock_timeout_seconds = 0.5\n")
    assert load(str(path), {}).redis.lock_timeout_seconds == 0.5
    for too_far in ("0", "6"):
        path.write_text(f"[redis]\nlock_timeout_seconds = {too_far}\n")
        with pytest.raises(ConfigError) as caught:
            load(str(path), {})
        assert str(caught.value) == (
            f"config.toml: redis.lock_timeout_seconds: expected a number 0.01-5, got {too_far}"
        )


# The real daemon and the real Redis, paused.

TICK = 0.2  # the cron interval of the other daemon tests
PAUSE_SECONDS = 8.0


@contextmanager
def redis_paused(seconds: float) -> Iterator[None]:
    """Every client of the shared Redis paused for seconds, then unpaused, always. (Redis 7.0
    holds back CLIENT UNPAUSE itself under a pause of ALL, so the pause's own length is what
    keeps it short; the UNPAUSE returns once it is over.)"""
    admin = redis.Redis.from_url(REDIS_URL, socket_timeout=seconds + 5)
    try:
        admin.execute_command("CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL")
        yield
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()


class DelayedTraffic:
    """Publishes delayed messages (1 or 2 s) every 0.1 s in one thread and takes them in
    another, noting when each was due and when it came."""

    def __init__(self, address: str, queue: str) -> None:
        self.publisher, self.subscriber = BusClient(address), BusClient(address)
        self.queue = queue
        self.due: dict[str, float] = {}
        self.arrived: dict[str, list[float]] = {}
        self.sending = threading.Event()
        self.taking = threading.Event()
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._take)]

    def start(self) -> None:
        self.sending.set()
        self.taking.set()
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending, wait until the last message is due and taken, stop taking."""
        self.sending.clear()
        self.threads[0].join()
        time.sleep(max(0.0, max(self.due.values()) - time.monotonic()) + 1.5)
        self.taking.clear()
        self.threads[1].join()
        self.publisher.close()
        self.subscriber.close()

    def _send(self) -> None:
        n = 0
        while self.sending.is_set():
            data, delay = f"m{n}", 1 + n % 2
            sent_at = time.monotonic()
            self.publisher.delay_publish(self.queue, data, delay=delay)
            self.due[data] = sent_at + delay
            n += 1
            time.sleep(0.1)

    def _take(self) -> None:
        while self.taking.is_set():
            reply = self.subscriber.try_subscribe(self.queue, timeout=0.5)
            if reply is not None:
                self.arrived.setdefault(reply.data, []).append(time.monotonic())
                self.subscriber.ack(reply.id)


def redis_state(daemon: Any) -> dict[str, Any]:
    status, body = daemon.http_get("/stats")
    assert status == 200
    return cast(dict[str, Any], json.loads(body)["redis"])


@pytest.mark.slow
def test_delayed_messages_stay_on_time_while_redis_hangs(make_daemon: Any) -> None:
    daemon = make_daemon(cron={"interval_seconds": TICK})
    daemon.wait_ready()
    assert redis_state(daemon)["state"] == "ok"
    traffic = DelayedTraffic(daemon.grpc_address, "hang")
    traffic.start()
    try:
        time.sleep(2.5)
        with redis_paused(PAUSE_SECONDS):
            paused_at = time.monotonic()
            time.sleep(1.0)
            readyz = daemon.http_get("/readyz")
            stats = redis_state(daemon)
            metrics = daemon.http_get("/metrics")[1]
        unpaused_at = time.monotonic()
    finally:
        traffic.stop()
    assert readyz[0] == 200, readyz
    assert "no answer within 0.25 s" in json.loads(readyz[1])["degraded"]["redis"]
    assert stats["state"] == "degraded" and stats["reason"] == "no answer within 0.25 s"
    assert "eventbus_redis_degraded 1.0" in metrics
    assert set(traffic.arrived) == set(traffic.due)  # none lost
    assert [d for d, times in traffic.arrived.items() if len(times) > 1] == []  # none twice
    late = {
        data: round(traffic.arrived[data][0] - due, 3)
        for data, due in traffic.due.items()
        if paused_at <= due <= unpaused_at
    }
    assert len(late) >= 50
    assert {data: lateness for data, lateness in late.items() if lateness >= 1.0} == {}
    assert redis_state(daemon)["state"] == "ok"
    assert "eventbus_redis_degraded 0.0" in daemon.http_get("/metrics")[1]
    assert "degraded" not in json.loads(daemon.http_get("/readyz")[1])
    assert "Redis: answers within 0.25 s again" in daemon.log
