"""ModifyAckDeadline and stale ids for recorded deliveries (v2 Pull, v1 subscribe): the deadline
change as it travels the settlements queue, as the bookkeeping applies it in PostgreSQL (also
before its delivery's record, and out of order), which ids PostgreSQL knows are stale, and the
unary calls through a real daemon."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from eventbus.backends.store import Store
from eventbus.delivery.envelope import DeadlineChange, DeliveryRecord, Settlement, decode_settlement
from eventbus.jobs import ledger
from tests.bus_client import BusClient
from tests.servers import unique_name, with_store
from tests.v2_client import V2Client, message

# --- the change on the settlements queue ---------------------------------------------------


def test_a_deadline_change_travels_as_a_settlement_and_acks_stay_as_they_were() -> None:
    change = DeadlineChange(str(uuid.uuid4()), "deadline", 100.0, 130.5)
    assert decode_settlement(change.encode()) == change
    assert json.loads(change.encode())["deadline"] == 130.5
    ack = Settlement(change.delivery_id, "ack", 100.0)
    assert set(json.loads(ack.encode())) == {"delivery_id", "outcome", "at"}
    old = b'{"delivery_id":"' + ack.delivery_id.encode() + b'","outcome":"nack","at":5.0}'
    assert decode_settlement(old) == Settlement(ack.delivery_id, "nack", 5.0)
    assert type(decode_settlement(old)) is Settlement


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"delivery_id": "d", "outcome": "deadline", "at": 1.0}, TypeError),  # no deadline
        ({"delivery_id": "d", "outcome": "ack", "at": 1.0, "deadline": 2.0}, ValueError),
        ({"delivery_id": "d", "outcome": "deadline", "at": 1.0, "deadline": "soon"}, ValueError),
        ({"delivery_id": "d", "outcome": "deadline", "at": 1.0, "deadline": 1e13}, ValueError),
        ({"delivery_id": "d", "outcome": "deadline", "at": -1, "deadline": 2.0}, ValueError),
    ],
)
def test_a_malformed_deadline_change_is_refused_when_read(
    fields: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        decode_settlement(json.dumps(fields).encode())


# --- applied in PostgreSQL -----------------------------------------------------------------


def record(deadline_in: float = 60) -> DeliveryRecord:
    now = time.time()
    return DeliveryRecord(
        str(uuid.uuid4()), str(uuid.uuid4()), "q", b"body", 1, now, now + deadline_in, None
    )


def change(delivery_id: str, deadline: float, at: float | None = None) -> DeadlineChange:
    return DeadlineChange(delivery_id, "deadline", time.time() if at is None else at, deadline)


async def deadline_of(store: Store, delivery_id: str) -> float:
    value = await store.fetchval(
        "SELECT extract(epoch FROM deadline) FROM deliveries WHERE id = $1", uuid.UUID(delivery_id)
    )
    return float(value)


async def test_a_change_moves_an_open_deadline_and_leaves_a_done_one(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        open_, done = record(), record()
        await ledger.write_records(store, [open_, done])
        await store.execute("UPDATE deliveries SET done = true WHERE id = $1", uuid.UUID(done.id))
        later = time.time() + 600
        counts = await ledger.write_settlements(
            store, [change(open_.id, later), change(done.id, later)]
        )
        assert counts == []  # a deadline change settles nothing
        assert await deadline_of(store, open_.id) == pytest.approx(later, abs=1e-3)
        assert await deadline_of(store, done.id) == pytest.approx(done.deadline, abs=1e-3)
        assert await store.fetchval("SELECT count(*) FROM settlements") == 0

    await with_store(postgres_dsn, work)


async def test_a_change_stored_before_its_record_is_taken_by_the_record(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        late = record()
        later = time.time() + 300
        await ledger.write_settlements(store, [change(late.id, later)])
        await ledger.write_records(store, [late])
        assert await deadline_of(store, late.id) == pytest.approx(later, abs=1e-3)

    await with_store(postgres_dsn, work)


async def test_of_two_changes_the_one_asked_for_last_wins_in_any_order(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        held = record()
        await ledger.write_records(store, [held])
        now = time.time()
        first, second = change(held.id, now + 500, at=now), change(held.id, now + 20, at=now + 1)
        await ledger.write_settlements(store, [second])
        await ledger.write_settlements(store, [first])  # stored after, asked for before
        assert await deadline_of(store, held.id) == pytest.approx(now + 20, abs=1e-3)
        await ledger.write_settlements(store, [second, first])  # both in one batch
        assert await deadline_of(store, held.id) == pytest.approx(now + 20, abs=1e-3)

    await with_store(postgres_dsn, work)


async def test_records_and_changes_stored_at_once_always_meet(postgres_dsn: str) -> None:
    """Both writers commit at about the same time, many times over: every delivery ends with
    its changed deadline, whichever was stored second."""
    records = [record() for _ in range(300)]
    later = time.time() + 900

    async def work(store: Store) -> None:
        for start in range(0, len(records), 10):
            chunk = records[start : start + 10]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ledger.write_records, store, chunk)
                nursery.start_soon(
                    ledger.write_settlements, store, [change(r.id, later) for r in chunk]
                )
        unchanged = await store.fetchval(
            "SELECT count(*) FROM deliveries WHERE deadline <> to_timestamp($1::float8)", later
        )
        assert unchanged == 0

    await with_store(postgres_dsn, work)


async def test_stale_ids_are_those_done_or_nacked(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        current, acked, nacked, done = (record() for _ in range(4))
        await ledger.write_records(store, [current, acked, nacked, done])
        await store.execute("UPDATE deliveries SET done = true WHERE id = $1", uuid.UUID(done.id))
        now = time.time()
        nack_before_record = str(uuid.uuid4())
        await ledger.write_settlements(
            store,
            [
                Settlement(acked.id, "ack", now),
                Settlement(nacked.id, "nack", now),
                Settlement(nack_before_record, "nack", now),
            ],
        )
        unknown = str(uuid.uuid4())
        ids = [current.id, acked.id, nacked.id, done.id, nack_before_record, unknown]
        assert await ledger.stale(store, ids) == {nacked.id, done.id, nack_before_record}

    await with_store(postgres_dsn, work)


async def test_a_change_is_forgotten_a_while_after_its_deadline(postgres_dsn: str) -> None:
    async def work(store: Store) -> None:
        now = time.time()
        passed, coming = str(uuid.uuid4()), str(uuid.uuid4())
        await ledger.write_settlements(
            store,
            [
                change(passed, now - ledger.KEEP_PASSED_DEADLINES - 5),
                change(coming, now - ledger.KEEP_PASSED_DEADLINES + 30),
            ],
        )
        await ledger.clean(store, 100, 3600)
        kept = await store.fetch("SELECT delivery_id::text FROM deadline_changes")
        assert [row["delivery_id"] for row in kept] == [coming]

    await with_store(postgres_dsn, work)


# --- through a real daemon -----------------------------------------------------------------

# A recorded delivery not acked within 1 s comes back at the next republish tick (0.2 s); a
# nack at once.
SHORT = {
    "delivery": {"ack_deadline_seconds": 1, "nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
}


@pytest.fixture
def node(make_daemon: Any) -> Any:
    started = make_daemon(**SHORT)
    started.wait_ready()
    return started


@pytest.fixture
def v2(node: Any) -> Iterator[V2Client]:
    client = V2Client(node.grpc_address)
    yield client
    client.close()


def pull_one(v2: V2Client, queue: str, wait: float = 5) -> Any:
    (got,) = v2.pull(queue, wait_seconds=wait)
    return got


def test_an_extended_pull_is_not_redelivered_past_its_first_deadline(v2: V2Client) -> None:
    queue = unique_name("extend")
    v2.publish(*(message(queue, f"m{i}".encode()) for i in range(20)))
    held = v2.pull(queue, max_messages=20, wait_seconds=5)
    while len(held) < 20:
        held += v2.pull(queue, max_messages=20 - len(held), wait_seconds=5)
    assert v2.modify([m.ack_id for m in held], 30) == []  # at once, before the records land
    assert v2.pull(queue, max_messages=20, wait_seconds=3.0) == []  # 1 s deadlines long past
    assert v2.acknowledge([m.ack_id for m in held]) == []
    assert v2.pull(queue, wait_seconds=1.0) == []


def test_a_shortened_deadline_and_a_zero_one_bring_the_message_back(v2: V2Client) -> None:
    queue = unique_name("shorten")
    v2.publish(message(queue, b"again"))
    first = pull_one(v2, queue)
    assert v2.modify([first.ack_id], 30) == []
    assert v2.modify([first.ack_id], 0) == []  # a nack, now
    second = pull_one(v2, queue)
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    assert v2.acknowledge([second.ack_id]) == []


def test_an_ack_of_a_delivery_already_redelivered_is_invalid(v2: V2Client, node: Any) -> None:
    queue = unique_name("redelivered")
    v2.publish(message(queue, b"slow"))
    first = pull_one(v2, queue)
    second = pull_one(v2, queue, wait=10)  # its deadline passed: attempt 2
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    deadline = time.monotonic() + 10  # the first is marked retried right after it is published
    while (answer := v2.acknowledge([first.ack_id])) != [first.ack_id]:
        assert time.monotonic() < deadline, answer
        time.sleep(0.1)
    assert v2.modify([first.ack_id], 30) == [first.ack_id]
    assert v2.nack([first.ack_id]) == [first.ack_id]
    v1 = BusClient(node.grpc_address)
    v1.ack(first.ack_id)  # v1 stays idempotent: OK
    v1.close()
    assert v2.acknowledge([second.ack_id]) == []  # the current delivery is untouched
    assert v2.pull(queue, wait_seconds=2.0) == []


def test_a_nacked_delivery_cannot_be_acked_or_extended_after(v2: V2Client) -> None:
    queue = unique_name("nacked")
    v2.publish(message(queue, b"once"))
    first = pull_one(v2, queue)
    assert v2.nack([first.ack_id]) == []
    second = pull_one(v2, queue)
    assert second.attempt == 2
    assert v2.acknowledge([first.ack_id, second.ack_id]) == [first.ack_id]
    assert v2.modify([first.ack_id], 30) == [first.ack_id]
    assert v2.pull(queue, wait_seconds=1.5) == []


def test_made_up_and_malformed_recorded_ids_are_invalid(v2: V2Client) -> None:
    made_up = [str(uuid.uuid4()), "nonsense", ""]
    assert v2.acknowledge(made_up) == made_up
    assert v2.modify(made_up, 30) == made_up
    assert v2.nack(made_up) == made_up


def test_stale_ids_are_accepted_when_postgresql_does_not_answer(v2: V2Client, node: Any) -> None:
    queue = unique_name("unchecked")
    v2.publish(message(queue, b"x"))
    first = pull_one(v2, queue)
    assert v2.nack([first.ack_id]) == []
    second = pull_one(v2, queue)
    assert v2.acknowledge([first.ack_id]) == [first.ack_id]  # known nacked
    dsn = tomllib.loads(node.config_path.read_text())["postgres"]["dsn"]
    statement = "BEGIN; LOCK TABLE deliveries, settlements; SELECT pg_sleep(4); COMMIT;"
    locker = subprocess.Popen(["psql", "-q", dsn, "-c", statement], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the lock is taken
        assert v2.acknowledge([first.ack_id]) == []  # unchecked: taken as current
        assert locker.poll() is None  # answered while the tables were still locked
    finally:
        assert locker.wait(timeout=30) == 0
    assert v2.acknowledge([second.ack_id]) == []
