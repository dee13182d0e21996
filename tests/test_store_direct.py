"""Queries from the request path (the asyncio side) are bounded, waiting on a lock included."""

from __future__ import annotations

import subprocess
import uuid

import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.store import Store
from tests.servers import with_store


async def test_a_direct_write_on_a_locked_table_gives_up_within_its_timeout(
    postgres_dsn: str,
) -> None:
    async def work(store: Store) -> None:
        side = store.asyncio_side(0.5)
        locker = await trio.lowlevel.open_process(
            [
                "psql",
                "-q",
                postgres_dsn,
                "-c",
                "BEGIN; LOCK TABLE settlements; SELECT pg_sleep(4); COMMIT;",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            await trio.sleep(0.5)  # the lock is taken
            with trio.fail_after(3):  # far less than the lock lasts
                with pytest.raises(TimeoutError):
                    await aio.call(
                        side.execute,
                        "INSERT INTO settlements (delivery_id, outcome, settled_at) "
                        "VALUES ($1, 'ack', now())",
                        uuid.uuid4(),
                    )
        finally:
            with trio.fail_after(10):
                await locker.wait()
        assert await aio.call(side.execute, "SELECT 1") == "SELECT 1"  # the pool still serves

    await with_store(postgres_dsn, work)
