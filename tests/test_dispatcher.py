"""The delay job's batches against the real PostgreSQL, with a publisher that records or fails."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, cast

import pytest
import trio
from pamqp.commands import Basic

from eventbus.backends import aio
from eventbus.backends.store import Store, open_store
from eventbus.config import PostgresConfig
from eventbus.delivery.envelope import DelayedMessage, Outgoing
from eventbus.delivery.publisher import CONFIRMED, Outcome, Publisher, Target
from eventbus.errors import FailedPrecondition, Unavailable
from eventbus.jobs import delay
from eventbus.ops.metrics import Metrics


class RecordingPublisher:
    """Takes batches like Publisher.to_targets; from batch fail_at on, RabbitMQ is unavailable.
    Messages whose id is in refuse are refused, those in unavailable_once unavailable once."""

    generation = 1  # one connection all along

    def __init__(
        self,
        fail_at: int | None = None,
        refuse: Iterable[str] = (),
        unavailable_once: Iterable[str] = (),
    ) -> None:
        self.batches: list[list[str]] = []
        self.confirmed: Counter[str] = Counter()
        self._fail_at = fail_at
        self._refuse = set(refuse)
        self._unavailable_once = set(unavailable_once)
        self.unconfirmed: dict[str, asyncio.Future[Any]] = {}  # sent, confirm not come in time

    async def to_targets(self, messages: Sequence[tuple[Target, Outgoing]]) -> list[Outcome]:
        await trio.sleep(0.01)  # lets the next claim run meanwhile, as a real publish does
        if self._fail_at is not None and len(self.batches) + 1 >= self._fail_at:
            return [Outcome("unavailable", Unavailable("RabbitMQ is unavailable (test)"))] * len(
                messages
            )
        ids = [m.properties.message_id or "" for _, m in messages]
        self.batches.append(ids)
        outcomes = [self._outcome(message_id) for message_id in ids]
        self.confirmed.update(i for i, o in zip(ids, outcomes, strict=True) if o == CONFIRMED)
        return outcomes

    def _outcome(self, message_id: str) -> Outcome:
        if message_id in self.unconfirmed:
            pending = self.unconfirmed.pop(message_id)
            return Outcome("unavailable", Unavailable("not confirmed in time (test)"), pending)
        if message_id in self._refuse:
            return Outcome("refused", FailedPrecondition("RabbitMQ refused it (test)"))
        if message_id in self._unavailable_once:
            self._unavailable_once.discard(message_id)
            return Outcome("unavailable", Unavailable("not now (test)"))
        return CONFIRMED


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
    return [DelayedMessage(str(uuid.uuid4()), "queue", "q", b"x", due_at, 0) for _ in range(count)]


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
        with pytest.raises(Unavailable):
            await dispatcher(store, publisher).tick()
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


async def test_a_refused_message_is_quarantined_and_the_rest_go_exactly_once(
    postgres_dsn: str,
) -> None:
    due = due_messages(delay.BATCH + 20, time.time() - 60)
    bad, late = due[3].id, due[delay.BATCH + 5].id
    publisher = RecordingPublisher(refuse=[bad], unavailable_once=[late])

    async def work(store: Store) -> None:
        job = dispatcher(store, publisher)
        await job.tick()  # the second batch had one RabbitMQ could not take: it waits
        await store.execute("UPDATE delayed_messages SET claimed_until = NULL")  # time passes
        for _ in range(3):
            await job.tick()
        [left] = await delay.pending(store, None, None, 10)
        assert (left.id, left.quarantine_reason) == (bad, "RabbitMQ refused it (test)")
        assert left.quarantined_at is not None
        assert [p.id for p in await delay.pending(store, None, None, 10, quarantined=True)] == [bad]
        assert await delay.cancel(store, bad)

    await with_store(postgres_dsn, due, work)
    assert publisher.confirmed == Counter(m.id for m in due if m.id != bad)  # each once
    assert sum(batch.count(bad) for batch in publisher.batches) == 1  # never retried
    assert [len(b) for b in publisher.batches] == [delay.BATCH, 20, 1]


async def test_a_message_rabbitmq_cannot_take_waits_alone_and_the_tick_goes_on(
    postgres_dsn: str,
) -> None:
    due = due_messages(3 * delay.BATCH, time.time() - 60)
    full = due[7].id  # its queue is full, say: RabbitMQ nacks it
    publisher = RecordingPublisher(unavailable_once=[full])

    async def work(store: Store) -> None:
        job = dispatcher(store, publisher)
        await job.tick()  # no Unavailable: the other batches go in this same tick
        [row] = await store.fetch(
            "SELECT id::text, claim_token, claimed_until > now() AS backing_off, "
            "publish_failures, last_failure FROM delayed_messages"
        )
        assert (row["id"], row["claim_token"], row["backing_off"]) == (full, None, True)
        assert (row["publish_failures"], row["last_failure"]) == (1, "not now (test)")
        await job.tick()  # still backing off: not claimed first again
        assert [len(b) for b in publisher.batches] == [delay.BATCH] * 3
        await store.execute("UPDATE delayed_messages SET claimed_until = now()")
        await job.tick()
        assert await free_rows_left(store) == 0

    await with_store(postgres_dsn, due, work)
    assert publisher.confirmed == Counter(m.id for m in due)
    assert [len(b) for b in publisher.batches] == [delay.BATCH] * 3 + [1]


async def new_future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


async def test_a_message_sent_but_not_confirmed_is_held_until_its_confirm_comes(
    postgres_dsn: str,
) -> None:
    due = due_messages(5, time.time() - 60)
    stuck = due[2].id
    publisher = RecordingPublisher()

    async def work(store: Store) -> None:
        confirmation = publisher.unconfirmed[stuck] = await aio.call(new_future)
        job = dispatcher(store, publisher)
        await job.tick()
        [row] = await store.fetch(
            "SELECT id::text, claim_token IS NOT NULL AS held, claimed_until > now() AS later "
            "FROM delayed_messages"
        )
        assert (row["id"], row["held"], row["later"]) == (stuck, True, True)
        await store.execute("UPDATE delayed_messages SET claimed_until = now()")  # ran out
        await job.settle_unconfirmed()  # still waiting: claimed again
        await job.tick()
        assert sum(batch.count(stuck) for batch in publisher.batches) == 1
        confirmation.set_result(Basic.Ack())
        await job.settle_unconfirmed()
        assert await free_rows_left(store) == 0

    await with_store(postgres_dsn, due, work)


async def test_a_held_message_whose_connection_went_goes_again(postgres_dsn: str) -> None:
    due = due_messages(1, time.time() - 60)
    publisher = RecordingPublisher()

    async def work(store: Store) -> None:
        publisher.unconfirmed[due[0].id] = await aio.call(new_future)  # never resolves
        job = dispatcher(store, publisher)
        with pytest.raises(Unavailable):  # none of the batch confirmed: the tick ends
            await job.tick()
        assert await store.fetchval("SELECT claim_token IS NOT NULL FROM delayed_messages")
        publisher.generation = 2  # a reconnect: the confirm will never come
        await job.settle_unconfirmed()
        await store.execute("UPDATE delayed_messages SET claimed_until = now()")  # back-off
        await job.tick()
        assert await free_rows_left(store) == 0

    await with_store(postgres_dsn, due, work)
    assert [batch for batch in publisher.batches] == [[due[0].id], [due[0].id]]
