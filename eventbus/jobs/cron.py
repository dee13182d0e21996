"""Periodic jobs under a Redis lock: one node runs each tick of a job, as an optimisation.

The guarantee that no row is moved twice lives in PostgreSQL (row claims); the lock only keeps
the other nodes from competing for them. While Redis is unreachable or slow every node runs its
jobs on the claims alone, so delayed messages and retries stay on time through a Redis outage or
hang: once a lock call has missed its short deadline, the ticks leave the lock alone until the
background probe (lock.RedisHealth.watch) finds Redis quick again, and renewing or releasing the
lock never waits longer than that deadline.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..backends.lock import RedisLock
from ..backends.retry import describe

logger = logging.getLogger(__name__)

RELEASE_TIMEOUT = 2.0  # a bound of its own on the shielded release; the lock's is shorter
SHORTEST_WAIT = 0.05  # between two ticks, however soon the job asks to run again

# A job may return in how many seconds it wants to run again (the next delayed message falls due
# before the next tick, say); None means at the next tick.
Job = Callable[[], Awaitable[float | None]]
# Work a node does every interval whether it holds the lock or not: its own claims to keep.
Upkeep = Callable[[], Awaitable[None]]


class Cron:
    """Runs one job every interval seconds while this node holds the job's lock."""

    def __init__(
        self,
        name: str,
        job: Job,
        lock: RedisLock,
        interval: float,
        lock_ttl: float,
        upkeep: Upkeep | None = None,
    ) -> None:
        self.name = name
        self._job = job
        self._upkeep = upkeep
        self._maybe_held = False  # a hold timed out, or a release was skipped: ours, perhaps
        self._lock = lock
        self._interval = interval
        self._waiting: trio.CancelScope | None = None  # the wait for the next tick
        self._tick_started = 0.0
        self._renew_every = max(0.05, lock_ttl / 3)
        self._redis_down = False
        self.holding = False

    async def run(self) -> None:
        """Tick forever. The lock is held only during a tick, so a node that dies between
        ticks leaves nothing to wait for, and one that dies during a tick blocks the job for at
        most the lock's TTL."""
        try:
            await self._tick_forever()
        finally:
            with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                await self._release_if_maybe_held()

    async def _tick_forever(self) -> None:
        while True:
            self._tick_started = trio.current_time()
            next_tick = self._tick_started + self._interval
            wanted_in = None
            await self._run_upkeep()
            if await self._may_run():
                try:
                    async with trio.open_nursery() as nursery:
                        if self.holding:
                            nursery.start_soon(self._keep_renewing)
                        wanted_in = await self._run_job()
                        nursery.cancel_scope.cancel()
                finally:
                    with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
                        await self._release()
            if wanted_in is not None:
                next_tick = min(next_tick, trio.current_time() + max(SHORTEST_WAIT, wanted_in))
            with trio.move_on_at(next_tick) as self._waiting:
                await trio.sleep_forever()
            self._waiting = None

    def set_interval(self, interval: float) -> None:
        """Tick every interval seconds from now on; a wait under way ends once the new interval
        since its tick started has passed, when that comes sooner (at once if it has)."""
        self._interval = interval
        if self._waiting is not None:
            self._waiting.deadline = min(self._waiting.deadline, self._tick_started + interval)

    async def _may_run(self) -> bool:
        """Whether to run the next tick: while holding the lock, or at once on row claims alone
        when Redis is slow or down (then without waiting for it)."""
        trouble = self._lock.trouble()
        if trouble is not None:
            self._note_redis_trouble(trouble)
            return True
        try:
            self.holding = await self._lock.hold()
        except Exception as error:
            if isinstance(error, TimeoutError):
                self._maybe_held = True  # it may have gone through before it timed out
            self._note_redis_trouble(describe(error))
            return True
        if not self.holding:
            self._maybe_held = False  # another node holds it
        if self._redis_down:
            logger.info("cron %s: Redis is back", self.name)
            self._redis_down = False
        return self.holding

    def _note_redis_trouble(self, reason: str) -> None:
        if not self._redis_down:
            logger.warning(
                "cron %s: Redis unreachable or slow (%s); running on row claims alone",
                self.name,
                reason,
            )
        self._redis_down = True

    async def _run_upkeep(self) -> None:
        if self._upkeep is None:
            return
        try:
            await self._upkeep()
        except Exception as error:
            logger.warning("cron %s: upkeep skipped: %s", self.name, describe(error))

    async def _run_job(self) -> float | None:
        """Run the job once; a failure (PostgreSQL down, say) skips this tick only."""
        try:
            return await self._job()
        except Exception as error:
            logger.warning("cron %s: tick skipped: %s", self.name, describe(error))
            return None

    async def _keep_renewing(self) -> None:
        """Renew the lock during a job, which may outlast the lock's TTL; beside the job, so a
        slow renewal never delays it, and not at all while Redis is known to be slow."""
        while True:
            await trio.sleep(self._renew_every)
            if self._lock.trouble() is not None:
                continue
            try:
                await self._lock.hold()
            except Exception as error:
                logger.debug("cron %s: renewing the lock failed: %s", self.name, describe(error))

    async def _release(self) -> None:
        """Give the lock up after a tick that held it; not tried once Redis is known to be slow
        (the lock then expires, or goes with the next tick that holds it)."""
        if not self.holding:
            return
        self.holding = False
        if self._lock.trouble() is not None:
            self._maybe_held = True
            return
        await self._release_if_maybe_held(always=True)

    async def _release_if_maybe_held(self, *, always: bool = False) -> None:
        """Release the lock if this node may hold it (the script only deletes this token's),
        so a node stopping after Redis was slow leaves no lock behind for its TTL."""
        if not (always or self._maybe_held):
            return
        try:
            await self._lock.release()
            self._maybe_held = False
        except Exception as error:
            self._maybe_held = True
            logger.debug("cron %s: releasing the lock failed: %s", self.name, describe(error))
