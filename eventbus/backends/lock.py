"""Redis: the client behind trio-flavoured calls, each under a deadline, and the cron lock.

The lock is an optimisation (rows are claimed in PostgreSQL), so Redis is never worth a wait:
each lock call has a short deadline (redis.lock_timeout_seconds). A call that misses it, or
fails, marks Redis degraded (slow, or paused) or down (refused); the crons then leave the lock
alone and run on their row claims, while a probe in the background waits for Redis to answer
within the deadline again.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis.asyncio as aredis
import redis.exceptions
import trio

from ..config import RedisConfig
from . import aio
from .retry import connect_within, describe, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)
PROBE_INTERVAL = 0.5  # between two probes of a Redis known to be slow or down
# A script, as the lock's calls are, so that a pause of writes (which PING passes) counts too.
PROBE = "return 1"

OK, DEGRADED, DOWN = "ok", "degraded", "down"


class RedisHealth:
    """How Redis answered the lock lately: ok; degraded (no answer within the timeout: slow,
    paused); or down (refused, unreachable). Why, and since when."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.state = OK
        self.reason = ""
        self.since = time.time()
        self._trouble = trio.Event()

    @property
    def ok(self) -> bool:
        return self.state == OK

    def trouble(self) -> str | None:
        """Why Redis is not worth waiting for (with since when), or None while it is."""
        if self.ok:
            return None
        since = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="seconds")
        return f"{self.state} since {since}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        """For /stats: state, reason and since when (ISO 8601, UTC)."""
        since = datetime.fromtimestamp(self.since, UTC).isoformat(timespec="milliseconds")
        return {"state": self.state, "reason": self.reason, "since": since}

    async def timed(self, call: Callable[[], Awaitable[T]]) -> T:
        """call() within the timeout; a failure marks Redis degraded or down, and is raised
        (a missed deadline as TimeoutError)."""
        try:
            with trio.fail_after(self.timeout):
                return await call()
        except trio.TooSlowError:
            reason = f"no answer within {self.timeout:g} s"
            self._failed(DEGRADED, reason)
            raise TimeoutError(reason) from None
        except Exception as error:
            self._failed(DOWN, describe(error))
            raise

    async def watch(self, probe: Callable[[], Awaitable[object]]) -> None:
        """Forever: while Redis is degraded or down, probe it every PROBE_INTERVAL, and call it
        ok again once a probe is answered within the timeout. Never raises."""
        while True:
            await self._trouble.wait()
            await trio.sleep(PROBE_INTERVAL)
            try:
                await self.timed(probe)
            except Exception:
                continue
            self._recovered()

    def _failed(self, state: str, reason: str) -> None:
        if self.ok:
            logger.warning("Redis: %s (%s); the crons run on row claims alone", state, reason)
        if state != self.state:
            self.since = time.time()
        self.state, self.reason = state, reason
        self._trouble.set()

    def _recovered(self) -> None:
        logger.info(
            "Redis: answers within %g s again, after %.1f s %s",
            self.timeout,
            time.time() - self.since,
            self.state,
        )
        self.state, self.reason, self.since = OK, "", time.time()
        self._trouble = trio.Event()


class Redis:
    """The daemon's Redis client; keys are always under the configured prefix."""

    def __init__(self, client: aredis.Redis, key_prefix: str, lock_timeout: float) -> None:
        self._client = client
        self.key_prefix = key_prefix
        self.health = RedisHealth(lock_timeout)

    async def ping(self) -> None:
        """Raise unless Redis answers PING; waits at most CALL_TIMEOUT."""
        with trio.fail_after(CALL_TIMEOUT):
            await aio.call(self._client.ping)

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script; waits at most CALL_TIMEOUT."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(self._client.eval, script, len(keys), *keys, *args)

    async def probe(self) -> None:
        """One quick call, as the lock's are; waits at most CALL_TIMEOUT."""
        await self.eval(PROBE, [], [])

    async def readiness(self) -> str | None:
        """For /readyz: None while Redis answers within the lock timeout, else why not. Never
        raises: the node works without Redis, degraded."""
        if self.health.ok:
            try:
                await self.health.timed(self.probe)
            except Exception as error:
                logger.debug("Redis: readiness probe failed: %s", describe(error))
        return self.health.trouble()

    async def close(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aio.call(self._client.aclose)


async def open_redis(config: RedisConfig, window: float) -> Redis:
    """Connect within window seconds; the first PING proves the server answers."""
    client = aredis.from_url(config.url, socket_timeout=5, socket_connect_timeout=5)
    redis_ = Redis(client, config.key_prefix, config.lock_timeout_seconds)
    try:
        await connect_within("Redis", redact(config.url), redis_.ping, window, TRANSIENT_ERRORS)
    except BaseException:
        await redis_.close()
        raise
    return redis_


async def run(
    config: RedisConfig,
    window: float,
    *,
    task_status: trio.TaskStatus[Redis] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a Redis client to the daemon until cancelled, then close it; meanwhile probe
    Redis whenever it is known to be slow or down."""
    redis_ = await open_redis(config, window)
    logger.info("Redis: connected to %s", redact(config.url))
    try:
        task_status.started(redis_)
        await redis_.health.watch(redis_.probe)
    finally:
        await redis_.close()


# Take the lock when free, or extend it when this token holds it: 1 when held afterwards.
HOLD = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisLock:
    """A lock with a TTL in Redis, held by one token; renewed by holding it again. Each call
    waits at most the lock timeout, and its failure marks Redis degraded or down."""

    def __init__(self, redis_: Redis, name: str, ttl_seconds: float) -> None:
        self._redis = redis_
        self.health = redis_.health
        self.key = f"{redis_.key_prefix}lock:{name}"
        self.token = str(uuid.uuid4())
        self._ttl_ms = max(1, int(ttl_seconds * 1000))

    def trouble(self) -> str | None:
        """Why the lock's Redis is not worth a wait now, or None when it is."""
        return self.health.trouble()

    async def hold(self) -> bool:
        """Acquire or renew; True when this holder has the lock for another TTL."""
        return bool(await self._call(HOLD, [self.token, self._ttl_ms]))

    async def release(self) -> None:
        """Give the lock up if this holder has it."""
        await self._call(RELEASE, [self.token])

    async def _call(self, script: str, args: list[Any]) -> Any:
        return await self.health.timed(lambda: self._redis.eval(script, [self.key], args))
