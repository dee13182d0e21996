"""Redis: the client behind trio-flavoured calls, each under a deadline."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis.asyncio as aredis
import redis.exceptions
import trio

from . import aio
from .config import RedisConfig
from .retry import connect_within, redact

logger = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
)


class Redis:
    """The daemon's Redis client; keys are always under the configured prefix."""

    def __init__(self, client: aredis.Redis, key_prefix: str) -> None:
        self._client = client
        self.key_prefix = key_prefix

    async def ping(self) -> None:
        """Raise unless Redis answers PING; waits at most CALL_TIMEOUT."""
        with trio.fail_after(CALL_TIMEOUT):
            await aio.call(self._client.ping)

    async def eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script; waits at most CALL_TIMEOUT."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(self._client.eval, script, len(keys), *keys, *args)

    async def close(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await aio.call(self._client.aclose)


async def open_redis(config: RedisConfig, window: float) -> Redis:
    """Connect within window seconds; the first PING proves the server answers."""
    client = aredis.from_url(config.url, socket_timeout=5, socket_connect_timeout=5)
    redis_ = Redis(client, config.key_prefix)
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
    """Serve a Redis client to the daemon until cancelled, then close it."""
    redis_ = await open_redis(config, window)
    logger.info("Redis: connected to %s", redact(config.url))
    try:
        task_status.started(redis_)
        await trio.sleep_forever()
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
    """A lock with a TTL in Redis, held by one token; renewed by holding it again."""

    def __init__(self, redis_: Redis, name: str, ttl_seconds: float) -> None:
        self._redis = redis_
        self.key = f"{redis_.key_prefix}lock:{name}"
        self.token = str(uuid.uuid4())
        self._ttl_ms = max(1, int(ttl_seconds * 1000))

    async def hold(self) -> bool:
        """Acquire or renew; True when this holder has the lock for another TTL."""
        return bool(await self._redis.eval(HOLD, [self.key], [self.token, self._ttl_ms]))

    async def release(self) -> None:
        """Give the lock up if this holder has it."""
        await self._redis.eval(RELEASE, [self.key], [self.token])
