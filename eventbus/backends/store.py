"""PostgreSQL: the asyncpg pool behind trio-flavoured calls, each under a deadline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import asyncpg
import trio

from ..config import PostgresConfig
from . import aio, migrations
from .retry import connect_within, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
)


class Queries(Protocol):
    """What the ledger's writers need: a Store (trio side), or a Store's asyncio side."""

    async def fetch(self, sql: str, *args: Any) -> list[Any]: ...

    async def execute(self, sql: str, *args: Any) -> str: ...


class Store:
    """Queries against the daemon's PostgreSQL database.

    Each call is bounded by CALL_TIMEOUT as a safety net against a silent peer; callers that need
    a tighter limit put trio.fail_after around the call.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(self._pool.fetch, sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of a query; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(self._pool.fetchval, sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run a statement and return its status tag; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(self._pool.execute, sql, *args)

    async def transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run work(connection) inside one transaction on one connection, and return its result.

        work runs on the asyncio side of the seam: it may only await that connection's methods.
        This call has no deadline of its own: the caller bounds it.
        """

        async def in_transaction() -> T:
            async with self._pool.acquire() as connection, connection.transaction():
                return await work(connection)

        return await aio.call(in_transaction)

    def asyncio_side(self, timeout: float) -> AsyncioSide:
        """The same pool for code on the asyncio side of the seam, each call under timeout."""
        return AsyncioSide(self._pool, timeout)

    async def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        await self.fetchval("SELECT 1")

    async def close(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            await aio.call(self._pool.close)
        if scope.cancelled_caught:
            self._pool.terminate()


class AsyncioSide:
    """Queries from the asyncio side of the seam (the request path), each under a timeout that
    includes waiting for a connection of the pool. A query that times out takes its connection
    down with it: asyncpg would otherwise wait, with no limit, for PostgreSQL to confirm the
    query's cancellation before the connection goes back to the pool."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._run("fetch", sql, args)  # type: ignore[no-any-return]

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._run("execute", sql, args)  # type: ignore[no-any-return]

    async def _run(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        async with asyncio.timeout(self._timeout) as deadline:
            connection = await self._pool.acquire()
        try:
            left = max(0.001, deadline.when() - asyncio.get_running_loop().time())  # type: ignore[operator]
            async with asyncio.timeout(left):
                return await getattr(connection, method)(sql, *args)
        except (TimeoutError, asyncio.CancelledError):
            connection.terminate()
            raise
        finally:
            await self._pool.release(connection)


async def open_store(config: PostgresConfig, window: float) -> Store:
    """Connect a pool within window seconds and bring the schema up to date."""
    pool = await connect_within(
        "PostgreSQL",
        redact(config.dsn),
        lambda: aio.call(asyncpg.create_pool, config.dsn, min_size=1, max_size=config.pool_size),
        window,
        TRANSIENT_ERRORS,
    )
    store = Store(pool)
    try:
        applied = await migrations.apply(store)
    except BaseException:
        await store.close()
        raise
    if applied:
        logger.info("PostgreSQL: applied migrations %s", ", ".join(applied))
    return store


async def run(
    config: PostgresConfig,
    window: float,
    *,
    task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a Store to the daemon until cancelled, then close the pool."""
    store = await open_store(config, window)
    logger.info("PostgreSQL: connected to %s", redact(config.dsn))
    try:
        task_status.started(store)
        await trio.sleep_forever()
    finally:
        await store.close()
