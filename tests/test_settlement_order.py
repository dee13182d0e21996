"""An ack always beats its redelivery: settlements are applied in order and the republish cron
waits for them; acked and nacked counts are taken once however records and settlements race."""

from __future__ import annotations

import subprocess
import threading
import time
import tomllib
import uuid
from collections import Counter
from typing import Any

import pytest
import trio

from eventbus.backends.store import Store
from eventbus.delivery.envelope import DeliveryRecord, Marker, Settlement, decode_settlement
from eventbus.jobs import ledger
from eventbus.jobs.bookkeeping import Progress
from tests.bus_client import BusClient
from tests.servers import with_store


def test_progress_ends_before_the_first_unfinished_batch() -> None:
    progress = Progress()
    first, second, third = progress.take(), progress.take(), progress.take()
    assert progress.finish(second, 20.0) is None  # the first is still being written
    assert progress.finish(third, None) is None
    assert progress.finish(first, 10.0) == 20.0  # all three now: the newest of them
    fourth = progress.take()
    assert progress.finish(fourth, 15.0) is None  # older than what was applied already
    assert progress.through == 20.0


def test_markers_and_settlements_share_the_ack_queue() -> None:
    settlement = Settlement(str(uuid.uuid4()), "ack", 12.5)
    assert decode_settlement(settlement.encode()) == settlement
    assert decode_settlement(Marker(99.0).encode()) == Marker(99.0)


def record(delivery_id: str, deadline: float) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id, str(uuid.uuid4()), "q", b"body", 1, deadline - 5, deadline, None
    )


async def claimed(store: Store) -> set[str]:
    due = await ledger.claim_due(store, ledger.new_token(), 100, 600, 60)
    return {d.id for d in due}


async def test_a_missed_deadline_waits_for_the_settlements_published_after_it(
    postgres_dsn: str,
) -> None:
    async def work(store: Store) -> None:
        now = time.time()
        late = str(uuid.uuid4())
        await ledger.write_records(store, [record(late, now - 10)])
        assert await claimed(store) == set()  # no settlement applied yet: its ack may be coming
        await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, now - 10 + ledger.CLOCK_SKEW / 2)
        assert await claimed(store) == set()  # applied up to just after it: within clock skew
        await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, now - 20)
        assert await claimed(store) == set()  # progress never goes back
        await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, now - 10 + ledger.CLOCK_SKEW)
        assert await claimed(store) == {late}

    await with_store(postgres_dsn, work)


async def test_records_and_settlements_stored_at_once_are_counted_once(postgres_dsn: str) -> None:
    """Both writers commit at about the same time, many times over: each pair is counted
    exactly once, by whichever comes second."""
    pairs = 400
    ids = [str(uuid.uuid4()) for _ in range(pairs)]
    counted: Counter[str] = Counter()

    async def write(store: Store, chunk: list[str]) -> None:
        async def records() -> None:
            for _queue, outcome, n in await ledger.write_records(
                store, [record(i, time.time() + 60) for i in chunk]
            ):
                counted[outcome] += n

        async def settlements() -> None:
            settled = [Settlement(i, "ack", time.time()) for i in chunk]
            for _queue, outcome, n in await ledger.write_settlements(store, settled):
                counted[outcome] += n

        async with trio.open_nursery() as nursery:
            nursery.start_soon(records)
            nursery.start_soon(settlements)

    async def work(store: Store) -> None:
        for start in range(0, pairs, 10):
            await write(store, ids[start : start + 10])
        counted_in_table = await store.fetchval("SELECT count(*) FROM settlements WHERE counted")
        assert counted_in_table == pairs

    await with_store(postgres_dsn, work)
    assert counted == {"ack": pairs}


def lock_tables(dsn: str, lock: str, seconds: float) -> subprocess.Popen[bytes]:
    """Hold a table lock from another session for seconds."""
    statement = f"BEGIN; LOCK TABLE {lock}; SELECT pg_sleep({seconds}); COMMIT;"
    return subprocess.Popen(["psql", "-q", dsn, "-c", statement], stdout=subprocess.DEVNULL)


@pytest.mark.parametrize(
    "lock",
    [
        # nothing of the bookkeeping is stored meanwhile
        "deliveries, settlements IN ACCESS EXCLUSIVE MODE",
        # records are stored, and may be read, while no ack or nack is
        "settlements IN EXCLUSIVE MODE",
    ],
)
def test_no_acked_message_comes_back_after_postgresql_stalls(make_daemon: Any, lock: str) -> None:
    """Tables are locked for four ack deadlines while messages are published, pulled, acked
    and some nacked: afterwards every message arrived, none that was acked came back, and each
    nacked one came back once."""
    daemon = make_daemon(
        delivery={"ack_deadline_seconds": 2, "nack_redelivery_delay_seconds": 1},
        cron={"interval_seconds": 0.2},
    )
    daemon.wait_ready()
    dsn = tomllib.loads(daemon.config_path.read_text())["postgres"]["dsn"]
    client = BusClient(daemon.grpc_address)
    sent = [f"m{i}" for i in range(300)]
    to_nack = set(sent[::10])
    received: Counter[str] = Counter()
    acked: set[str] = set()
    came_back: list[str] = []
    publishing = threading.Event()
    publishing.set()
    guard = threading.Lock()

    def publish() -> None:
        for data in sent:
            client.publish("stalled", data)
            time.sleep(0.04)
        publishing.clear()

    def pull_and_settle() -> None:
        quiet_since = time.monotonic()
        while publishing.is_set() or time.monotonic() - quiet_since < 8:
            reply = client.try_subscribe("stalled", timeout=1)
            if reply is None:
                continue
            quiet_since = time.monotonic()
            with guard:
                received[reply.data] += 1
                if reply.data in acked:
                    came_back.append(reply.data)
                nack = reply.data in to_nack and received[reply.data] == 1
            if nack:
                client.nack(reply.id)
                continue
            client.ack(reply.id)
            with guard:
                acked.add(reply.data)

    threads = [threading.Thread(target=f) for f in (publish, pull_and_settle, pull_and_settle)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    locker = lock_tables(dsn, lock, 8)
    for thread in threads:
        thread.join()
    assert locker.wait(timeout=30) == 0
    client.close()
    assert (set(sent) - acked, came_back) == (set(), [])
    assert received == Counter({data: 2 if data in to_nack else 1 for data in sent})


APPLIES = "this node applies it, in order"


def test_another_node_takes_the_ack_queue_over_when_its_node_dies(make_daemon: Any) -> None:
    settings = {
        "delivery": {"ack_deadline_seconds": 60, "nack_redelivery_delay_seconds": 1},
        # a node killed during a tick holds the cron's lock until its TTL runs out
        "cron": {"interval_seconds": 0.2, "lock_ttl_seconds": 2},
    }
    nodes = [make_daemon(**settings), make_daemon(**settings)]
    for node in nodes:
        node.wait_ready()
    deadline = time.monotonic() + 10
    while not any(APPLIES in node.log for node in nodes):
        assert time.monotonic() < deadline, "no node applies the ack queue"
        time.sleep(0.2)
    holder, other = nodes if APPLIES in nodes[0].log else nodes[::-1]
    holder.kill()
    client = BusClient(other.grpc_address)
    client.publish("handed", "once")
    first = client.subscribe("handed", timeout=10)
    client.nack(first.id)  # applied only once the surviving node consumes the ack queue
    again = client.subscribe("handed", timeout=20)
    client.ack(again.id)
    client.close()
    assert (again.data, again.id != first.id) == ("once", True)
    assert other.log.count(APPLIES) == 1


def test_a_time_stamp_postgresql_could_not_store_is_refused_when_read() -> None:
    for at in (1e13, -1.0, float("nan"), "soon"):
        with pytest.raises(ValueError):
            decode_settlement(Marker(at).encode())  # type: ignore[arg-type]
