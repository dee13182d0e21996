"""PostgreSQL: the asyncpg pool behind trio-flavoured calls, each under a deadline.

postgres.dsn may name several hosts (a primary and its standbys):
`postgresql://h1:5432,h2:5432/eventbus?target_session_attrs=read-write` (read-write is the default
for such a DSN). Each new connection tries the hosts in turn, the one that worked last first, and
keeps the first that takes writes; a broken connection is replaced, at its next use, the same way,
so after a failover the pool finds whichever host is the primary now. A write refused as
read-only (a primary turned standby, or fenced) drops the pool's connections and runs again on
fresh ones. While no host takes writes, calls fail with NoPrimary, an OSError like any outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg
import trio

from ..config import PostgresConfig
from . import aio, migrations
from .pgerrors import BROKEN_CONNECTION
from .retry import connect_within, describe, redact

logger = logging.getLogger(__name__)

T = TypeVar("T")

CALL_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
READ_ONLY_TRIES = 3  # a write refused as read-only runs again on fresh connections this often
PER_HOST_TIMEOUT = 5.0  # connecting to one host of several
TAKES_WRITES = "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'"


class NoPrimary(ConnectionError):
    """None of the DSN's hosts takes writes now: each is down or a standby (a failover is under
    way). An OSError, so every caller waits and retries as during any outage."""


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

    def __init__(self, pool: asyncpg.Pool, hosts: Hosts | None = None) -> None:
        self._pool = pool
        self._hosts = hosts

    @property
    def host(self) -> str | None:
        """host:port of the pool's newest connection (None: not known)."""
        return self._hosts.host if self._hosts else None

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(run_query, self._pool, "fetch", sql, args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row of a query; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(run_query, self._pool, "fetchval", sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        """Run a statement and return its status tag; waits on the database."""
        with trio.fail_after(CALL_TIMEOUT):
            return await aio.call(run_query, self._pool, "execute", sql, args)

    async def transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run work(connection) inside one transaction on one connection, and return its result.

        work runs on the asyncio side of the seam: it may only await that connection's methods.
        This call has no deadline of its own: the caller bounds it.
        """

        async def in_transaction(connection: asyncpg.Connection) -> T:
            async with connection.transaction():
                return await work(connection)

        return await aio.call(on_writable, self._pool, in_transaction)

    def asyncio_side(self, timeout: float) -> AsyncioSide:
        """The same pool for code on the asyncio side of the seam, each call under timeout."""
        return AsyncioSide(self._pool, timeout)

    async def ping(self) -> None:
        """Raise unless the database answers and takes writes: NoPrimary from a standby or a
        primary fenced read-only (it answers a SELECT, and refuses every write), after dropping
        the pool's connections so the next ones look for the host that takes writes now."""
        if not await self.fetchval(TAKES_WRITES):
            with trio.fail_after(CLOSE_TIMEOUT):
                await aio.call(self._pool.expire_connections)
            raise NoPrimary(
                f"PostgreSQL at {self.host or 'its host'} is read-only (a standby, or fenced)"
            )

    async def close(self) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            await aio.call(self._pool.close)
        if scope.cancelled_caught:
            self._pool.terminate()


class AsyncioSide:
    """Queries from the asyncio side of the seam (the request path), each under a timeout that
    includes waiting for a connection of the pool (see on_writable)."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._run("fetch", sql, args)  # type: ignore[no-any-return]

    async def execute(self, sql: str, *args: Any) -> str:
        return await self._run("execute", sql, args)  # type: ignore[no-any-return]

    async def _run(self, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        async with asyncio.timeout(self._timeout):
            return await run_query(self._pool, method, sql, args)


async def run_query(pool: asyncpg.Pool, method: str, sql: str, args: tuple[Any, ...]) -> Any:
    """(asyncio side) connection.<method>(sql, *args) on a connection of pool that takes writes."""
    return await on_writable(pool, lambda connection: getattr(connection, method)(sql, *args))


async def on_writable(pool: asyncpg.Pool, use: Callable[[Any], Awaitable[T]]) -> T:
    """(asyncio side) use(connection) on a connection of pool; waits on acquiring it and on use.

    A connection that turns out read-only (its host is, or has become, a standby) is dropped, with
    every other connection of the pool, and use runs again on a fresh one, up to READ_ONLY_TRIES
    times. A call cancelled or timed out takes its connection down with it: asyncpg would
    otherwise wait, with no limit, for PostgreSQL to confirm the query's cancellation before the
    connection goes back to the pool. So does a connection found broken (pgerrors): the pool
    opens a fresh one in its place. NoPrimary when no host takes writes.
    """
    for attempt in range(1, READ_ONLY_TRIES + 1):
        connection = await _acquire(pool)
        try:
            return await use(connection)
        except asyncpg.ReadOnlySQLTransactionError:
            if attempt == READ_ONLY_TRIES:
                raise
            logger.warning(
                "PostgreSQL: %s is read-only (a standby, or fenced); reconnecting",
                host_of(connection),
            )
            connection.terminate()
            await pool.expire_connections()
        except BROKEN_CONNECTION:  # its protocol state broken: never to be reused
            connection.terminate()
            raise
        except (TimeoutError, asyncio.CancelledError):
            connection.terminate()
            raise
        finally:
            await pool.release(connection)
    raise AssertionError("unreachable")


async def _acquire(pool: asyncpg.Pool) -> Any:
    with _standby_is_no_primary():
        return await pool.acquire()


@contextlib.contextmanager
def _standby_is_no_primary() -> Iterator[None]:
    """asyncpg's refusal of a host that does not take writes, as the outage it is here."""
    try:
        yield
    except asyncpg.TargetServerAttributeNotMatched:
        raise NoPrimary("no host takes writes: the host is a standby or read-only") from None


class Hosts:
    """The pool's connect function for a DSN naming several hosts: each is tried in turn, the one
    that worked last first, each within PER_HOST_TIMEOUT (asyncpg's own timeout covers all the
    hosts at once, so a silent host would use it up); a change of host is logged."""

    def __init__(self, dsn: str) -> None:
        self.hosts = hosts_of(dsn)
        self.host: str | None = None  # host:port of the newest connection
        self._password = urlsplit(dsn).password

    async def connect(self, dsn: str, **options: Any) -> asyncpg.Connection:
        """(asyncio side) A connection to the first host that takes it; NoPrimary when none
        does, saying why each was passed over. Any failure of one host (down, a standby, out of
        connections, refusing the login or the database) moves on to the next: another host
        may well take it. Waits on each host in turn."""
        if len(self.hosts) < 2:
            return self._note(await asyncpg.connect(dsn, **options))
        failures = []
        for host, port in sorted(self.hosts, key=lambda h: join_host(*h) != self.host):
            try:
                async with asyncio.timeout(PER_HOST_TIMEOUT):
                    connection = await asyncpg.connect(dsn, host=host, port=port, **options)
                return self._note(connection)
            except Exception as error:  # never cancellation: that is a BaseException
                why = hide(why_passed_over(error), self._password)
                failures.append(f"{join_host(host, port)} {why}")
        raise NoPrimary("no host takes writes: " + "; ".join(failures))

    def _note(self, connection: asyncpg.Connection) -> asyncpg.Connection:
        host = host_of(connection)
        if host != self.host and self.host is not None:
            logger.warning("PostgreSQL: the pool now connects to %s (was %s)", host, self.host)
        self.host = host
        return connection


def why_passed_over(error: BaseException) -> str:
    if isinstance(error, asyncpg.TargetServerAttributeNotMatched):
        return "is a standby or read-only"
    return describe(error)


def hide(text: str, password: str | None) -> str:
    """text with the password, should it appear in it, replaced by ***."""
    for secret in {password, unquote(password)} if password else ():
        text = text.replace(secret, "***")
    return text


def hosts_of(dsn: str) -> list[tuple[str, int | None]]:
    """The (host, port) pairs a DSN names: postgresql://user@h1:5432,[::1]:5433,h3/db."""
    hostspec = urlsplit(dsn).netloc.rpartition("@")[2]
    pairs: list[tuple[str, int | None]] = []
    for item in filter(None, hostspec.split(",")):
        host, _, port = item.rpartition(":") if not item.endswith("]") else (item, "", "")
        if not host or not port.isdigit():
            host, port = item, ""
        pairs.append((unquote(host).strip("[]"), int(port) if port else None))
    return pairs


def join_host(host: str, port: int | None) -> str:
    return f"{host}:{port or 5432}"


def host_of(connection: Any) -> str:
    """host:port of a connection (its socket path for a Unix socket)."""
    address = getattr(connection, "_addr", None)  # asyncpg keeps the address it connected to
    if isinstance(address, tuple) and len(address) >= 2:
        return join_host(str(address[0]), int(address[1]))
    return str(address)


def pool_options(dsn: str) -> dict[str, Any]:
    """asyncpg.create_pool keywords beyond the DSN: a DSN naming several hosts and no
    target_session_attrs gets read-write, so a standby is never taken for the primary."""
    named = {key for key, _ in parse_qsl(urlsplit(dsn).query)}
    env = "PGTARGETSESSIONATTRS" in os.environ
    if len(hosts_of(dsn)) > 1 and "target_session_attrs" not in named and not env:
        return {"target_session_attrs": "read-write"}
    return {}


async def open_store(config: PostgresConfig, window: float) -> Store:
    """Connect a pool within window seconds and bring the schema up to date. An attempt may walk
    every host, each for up to PER_HOST_TIMEOUT, so it gets that long per host (and a second)."""
    hosts = Hosts(config.dsn)
    options = {
        "min_size": 1,
        "max_size": config.pool_size,
        "connect": hosts.connect,
        **pool_options(config.dsn),
    }
    pool = await connect_within(
        "PostgreSQL",
        redact(config.dsn),
        lambda: aio.call(_create_pool, config.dsn, options),
        window,
        TRANSIENT_ERRORS,
        attempt_timeout=attempt_timeout(len(hosts.hosts)),
    )
    store = Store(pool, hosts)
    try:
        applied = await migrations.apply(store)
    except BaseException:
        await store.close()
        raise
    if applied:
        logger.info("PostgreSQL: applied migrations %s", ", ".join(applied))
    return store


def attempt_timeout(hosts: int) -> float:
    """How long one connect attempt may take: PER_HOST_TIMEOUT for each host it may walk,
    and a second for the rest (a silent first host must leave time for the next)."""
    return PER_HOST_TIMEOUT * max(1, hosts) + 1


async def _create_pool(dsn: str, options: dict[str, Any]) -> asyncpg.Pool:
    with _standby_is_no_primary():
        return await asyncpg.create_pool(dsn, **options)


async def run(
    config: PostgresConfig,
    window: float,
    *,
    task_status: trio.TaskStatus[Store] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve a Store to the daemon until cancelled, then close the pool."""
    store = await open_store(config, window)
    logger.info("PostgreSQL: connected to %s (on %s)", redact(config.dsn), store.host)
    try:
        task_status.started(store)
        await trio.sleep_forever()
    finally:
        await store.close()
