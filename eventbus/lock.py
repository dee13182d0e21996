"""Redis: the client behind trio-flavoured calls, each under a deadline."""

from __future__ import annotations

import logging

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
