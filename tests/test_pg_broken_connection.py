"""A pooled PostgreSQL connection its server died under, against the real PostgreSQL.

A server that dies while a connection idles in the pool can leave asyncpg's protocol in the
middle of an operation (consuming an error up to a sync point that never comes), the socket
still open: the next statement on it raises InternalClientError ("cannot switch to state 11;
another operation (2) is in progress"), from Exception alone. Here the connection is put in that
state by handing its protocol the ErrorResponse out of turn, as such a server sends it. The
request path must answer UNAVAILABLE (never INTERNAL), keep its promise to log a failed
mark_stored, and not give the broken connection back to the pool.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.pgerrors import OUTAGE
from eventbus.backends.store import Store, open_store
from eventbus.config import PostgresConfig
from eventbus.delivery.dedup import Dedup
from eventbus.delivery.outbound import Prepared
from eventbus.errors import Unavailable
from eventbus.jobs import bookkeeping
from tests.servers import unique_name


async def with_one_connection(postgres_dsn: str, work: Callable[[Store], Awaitable[None]]) -> None:
    """Run work on a Store whose pool holds a single connection, closed after."""
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn, pool_size=1), window=10)
        try:
            await work(store)
        finally:
            await store.close()


def error_response() -> bytes:
    """An ErrorResponse message as PostgreSQL sends it, with no ReadyForQuery after it."""
    fields = b"SERROR\0C57P01\0Mterminating connection due to administrator command\0\0"
    return b"E" + struct.pack("!i", len(fields) + 4) + fields


async def break_idle_connections(store: Store) -> list[Any]:
    """(asyncio side) Every connection idling in the store's pool, left as a dying server
    leaves it; returns them."""
    pool = store._pool
    holders = [h for h in pool._holders if h._con is not None and not h._in_use]
    for holder in holders:
        holder._con._protocol.data_received(error_response())
    return [holder._con for holder in holders]


def batch(queue: str, dedup_id: str) -> list[Prepared]:
    return [Prepared(0, "queue", queue, b"body", {}, 0, 0, dedup_id)]


async def test_a_broken_pooled_connection_is_unavailable_and_not_reused(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def work(store: Store) -> None:
        dedup = Dedup(store.asyncio_side(5.0), window_seconds=60)
        queue = unique_name("q")

        broken = await aio.call(break_idle_connections, store)
        assert broken, "the pool has an idle connection"
        with pytest.raises(Unavailable, match="InternalClientError"):
            await aio.call(dedup.reserve, batch(queue, "first"))
        assert all(connection.is_closed() for connection in broken)

        reserved = batch(queue, "second")  # a fresh connection takes the next call
        await aio.call(dedup.reserve, reserved)
        assert not reserved[0].duplicate

        await aio.call(break_idle_connections, store)
        with caplog.at_level(logging.WARNING, logger="eventbus.delivery.dedup"):
            await aio.call(dedup.mark_stored, reserved)  # logged, not raised
        assert "marking dedup ids stored in PostgreSQL failed" in caplog.text

        await aio.call(dedup.mark_stored, reserved)  # and marked on the next try
        again = batch(queue, "second")
        await aio.call(dedup.reserve, again)
        assert again[0].duplicate and again[0].message_id == reserved[0].message_id

    await with_one_connection(postgres_dsn, work)


async def test_the_broken_connection_error_is_an_outage_for_bookkeeping(postgres_dsn: str) -> None:
    """What the statement on such a connection raises is one bookkeeping waits out (HEAVY: the
    batch is retried whole, never split and quarantined row by row)."""
    errors: list[BaseException] = []

    async def work(store: Store) -> None:
        async def statement_on_broken() -> None:
            async with store._pool.acquire() as connection:
                connection._con._protocol.data_received(error_response())
                try:
                    await connection.execute("SELECT 1")
                except Exception as error:
                    errors.append(error)
                connection._con.terminate()

        with trio.fail_after(10):
            await aio.call(statement_on_broken)

    await with_one_connection(postgres_dsn, work)
    assert errors and "another operation" in str(errors[0]), errors
    assert isinstance(errors[0], bookkeeping.HEAVY)
    assert isinstance(errors[0], bookkeeping.NOT_THE_ROWS)
    assert isinstance(errors[0], OUTAGE)
