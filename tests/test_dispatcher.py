"""The delay job's batches against the real PostgreSQL, with a publisher that records or fails."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest
import trio

from eventbus import aio, delay
from eventbus.config import PostgresConfig
from eventbus.envelope import DelayedMessage, Outgoing
from eventbus.errors import Unavailable
from eventbus.metrics import Metrics
from eventbus.publisher import Publisher, Target
from eventbus.store import Store, open_store


class RecordingPublisher:
    """Takes batches like Publisher.to_targets; raises Unavailable from batch fail_at on."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.batches: list[list[str]] = []
        self._fail_at = fail_at

    async def to_targets(self, messages: Sequence[tuple[Target, Outgoing]]) -> None:
        await trio.sleep(0.01)  # lets the next claim run meanwhile, as a real publish does
        if self._fail_at is not None and len(self.batches) + 1 >= self._fail_at:
            raise Unavailable("RabbitMQ is unavailable (test)")
        self.batches.append([m.properties.message_id or "" for _, m in messages])


class FailingStore:
    """The real store, except that the statements named fail once, as PostgreSQL going away
    at that moment would."""

    def __init__(self, store: Store, *failing: str) -> None:
        self._store = store
        self._failing = set(failing)

    def fail_once(self, sql: str) -> None:
        self._failing.add(sql)

    def _check(self, sql: str) -> None:
        if sql in self._failing:
            self._failing.discard(sql)
            raise ConnectionResetError("PostgreSQL went away (test)")

    async def fetch(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return await self._store.fetch(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._store.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return await self._store.execute(sql, *args)


async def free_rows_left(store: Store) -> int:
    """How many delayed rows are left; each must be free to claim at once (no claim held)."""
    rows = await store.fetch("SELECT claim_token FROM delayed_messages")
    assert all(r["claim_token"] is None for r in rows)
    return len(rows)


def due_messages(count: int, due_at: float) -> list[DelayedMessage]:
    return [DelayedMessage(str(uuid.uuid4()), "queue", "q", "x", due_at, 0) for _ in range(count)]


async def with_store(postgres_dsn: str, pending: list[DelayedMessage], work: Any) -> None:
    """Run work(store) on a store that holds pending."""
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        try:
            await delay.write(store, pending)
            await work(store)
        finally:
            await store.close()


def dispatcher(store: Store | FailingStore, publisher: RecordingPublisher) -> delay.Dispatcher:
    return delay.Dispatcher(cast(Store, store), cast(Publisher, publisher), Metrics("test"), 60, 1)


async def test_a_tick_moves_every_due_message_once_in_batches(postgres_dsn: str) -> None:
    count = 2 * delay.BATCH + 37
    due = due_messages(count, time.time() - 60)
    later = due_messages(5, time.time() + 3600)
    publisher = RecordingPublisher()

    async def work(store: Store) -> None:
        next_due = await dispatcher(store, publisher).tick()
        left = await store.fetch("SELECT id FROM delayed_messages")
        assert sorted(str(r["id"]) for r in left) == sorted(m.id for m in later)
        assert next_due == pytest.approx(3600, abs=30)  # when the earliest of those falls due

    await with_store(postgres_dsn, due + later, work)
    moved = [message_id for batch in publisher.batches for message_id in batch]
    assert sorted(moved) == sorted(m.id for m in due)
    assert [len(b) for b in publisher.batches] == [delay.BATCH, delay.BATCH, 37]


async def test_a_tick_with_nothing_pending_asks_for_no_early_run(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        assert await dispatcher(store, RecordingPublisher()).tick() is None

    await with_store(postgres_dsn, [], work)


@pytest.mark.parametrize("fail_at", [1, 2])
async def test_a_failed_publish_gives_its_claims_back_at_once(
    postgres_dsn: str, fail_at: int
) -> None:
    due = due_messages(3 * delay.BATCH, time.time() - 60)
    publisher = RecordingPublisher(fail_at=fail_at)

    async def work(store: Store) -> None:
        with pytest.raises(ExceptionGroup) as failure:  # from the batch's nursery
            await dispatcher(store, publisher).tick()
        assert failure.group_contains(Unavailable)
        assert await free_rows_left(store) == len(due) - (fail_at - 1) * delay.BATCH

    await with_store(postgres_dsn, due, work)
    assert len(publisher.batches) == fail_at - 1


async def test_a_batch_published_but_not_forgotten_is_not_published_again(
    postgres_dsn: str,
) -> None:
    due = due_messages(delay.BATCH + 10, time.time() - 60)
    publisher = RecordingPublisher()

    async def work(store: Store) -> None:
        with pytest.raises(ExceptionGroup) as failure:
            await dispatcher(FailingStore(store, delay.FORGET), publisher).tick()
        assert failure.group_contains(ConnectionResetError)
        assert await free_rows_left(store) == 10  # the published batch is gone all the same

    await with_store(postgres_dsn, due, work)
    assert [len(b) for b in publisher.batches] == [delay.BATCH]


async def test_a_failed_claim_of_the_next_batch_lets_the_current_one_finish(
    postgres_dsn: str,
) -> None:
    due = due_messages(delay.BATCH + 10, time.time() - 60)
    publisher = RecordingPublisher()

    async def work(store: Store) -> None:
        failing = FailingStore(store)
        job = dispatcher(failing, publisher)
        first = await job._claim("00000000-0000-0000-0000-000000000001")
        failing.fail_once(delay.CLAIM)  # the claim made while this batch is published
        with pytest.raises(ConnectionResetError):
            await job._move_claiming_next(first)
        assert await free_rows_left(store) == 10
        assert await job.tick() is None  # the next tick moves the rest

    await with_store(postgres_dsn, due, work)
    assert [len(b) for b in publisher.batches] == [delay.BATCH, 10]
