"""The delivery ledger against the real PostgreSQL: finishing a claimed batch (dead letters, a
deadline) and cleaning finished rows."""

from __future__ import annotations

import datetime
import uuid

import asyncpg
import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.store import Store
from eventbus.jobs import ledger
from eventbus.jobs.ledger import DueDelivery
from tests.servers import with_store

FAILED_AT = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


async def add_delivery(store: Store, message_id: str, attempt: int, token: str | None) -> str:
    """A delivery past its deadline, claimed by token."""
    delivery_id = str(uuid.uuid4())
    await store.execute(
        "INSERT INTO deliveries (id, message_id, queue, body, attempt, delivered_at, deadline, "
        "claim_token, claimed_until) VALUES ($1, $2, 'q', $3, $4, now(), now(), $5, "
        "now() + interval '1 minute')",
        delivery_id,
        message_id,
        f"attempt {attempt}".encode(),
        attempt,
        token,
    )
    return delivery_id


def due(delivery_id: str, message_id: str, attempt: int) -> DueDelivery:
    return DueDelivery(
        delivery_id, message_id, "q", f"attempt {attempt}".encode(), attempt, None, FAILED_AT
    )


async def test_two_dead_deliveries_of_one_message_make_one_dead_letter(postgres_dsn: str) -> None:
    token, message_id = ledger.new_token(), str(uuid.uuid4())

    async def work(store: Store) -> None:
        first = await add_delivery(store, message_id, 4, token)
        second = await add_delivery(store, message_id, 5, token)
        dead = [(due(second, message_id, 5), None), (due(first, message_id, 4), "why not")]
        await ledger.finish(store, token, {first: "dead", second: "dead"}, dead)
        [letter] = await store.fetch("SELECT attempts, body, reason FROM dead_letters")
        assert (letter["attempts"], letter["body"], letter["reason"]) == (5, b"attempt 5", None)
        assert await store.fetchval("SELECT count(*) FROM deliveries WHERE done") == 2

    await with_store(postgres_dsn, work)


def test_one_dead_letter_per_message_keeps_the_last_attempt() -> None:
    a4, a5, b1 = due("d1", "m", 4), due("d2", "m", 5), due("d3", "other", 1)
    kept = ledger.one_per_message([(a4, "first"), (b1, None), (a5, "last")])
    assert kept == [(a5, "last"), (b1, None)]


async def test_a_reason_with_a_nul_character_is_stored(postgres_dsn: str) -> None:
    token, message_id = ledger.new_token(), str(uuid.uuid4())

    async def work(store: Store) -> None:
        delivery = await add_delivery(store, message_id, 1, token)
        dead = [(due(delivery, message_id, 1), "refused: \x00")]
        await ledger.finish(store, token, {delivery: "dead"}, dead)
        assert await store.fetchval("SELECT reason FROM dead_letters") == "refused: \\x00"

    await with_store(postgres_dsn, work)


async def test_finishing_gives_up_on_a_database_that_does_not_answer(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger, "FINISH_TIMEOUT", 1.0)
    token, message_id = ledger.new_token(), str(uuid.uuid4())

    async def work(store: Store) -> None:
        delivery = await add_delivery(store, message_id, 1, token)
        blocker = await aio.call(asyncpg.connect, postgres_dsn)
        try:  # a row lock held by another session: finish waits as on a silent server
            await aio.call(blocker.execute, "BEGIN; SELECT * FROM deliveries FOR UPDATE")
            with trio.fail_after(30), pytest.raises(trio.TooSlowError):
                await ledger.finish(store, token, {delivery: "retried"}, [])
        finally:
            await aio.call(blocker.close)
        assert await store.fetchval("SELECT done FROM deliveries") is False

    await with_store(postgres_dsn, work)


async def test_a_clean_goes_on_until_every_acked_delivery_is_gone(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        for _ in range(25):
            delivery = await add_delivery(store, str(uuid.uuid4()), 1, None)
            await store.execute(
                "INSERT INTO settlements (delivery_id, outcome, settled_at) "
                "VALUES ($1, 'ack', now())",
                delivery,
            )
        await ledger.clean(store, 10, 3600)
        assert await store.fetchval("SELECT count(*) FROM deliveries") == 0
        assert await store.fetchval("SELECT count(*) FROM settlements") == 0

    await with_store(postgres_dsn, work)
