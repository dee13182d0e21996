"""Per-queue retry policies on recorded deliveries (v1 subscribe and v2 Pull): what the republish
plan decides for each policy, backoff over time on trio's mock clock, the claim and its
postponements in the real PostgreSQL, and a v1 subscriber nacking through a real daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import asyncpg
import pytest
import trio
import trio.testing

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.backends.lock import RedisLock
from eventbus.backends.store import Store, open_store
from eventbus.config import AmqpConfig, Config, DeliveryConfig, PostgresConfig, QueuePolicyConfig
from eventbus.delivery.envelope import DeliveryRecord, Envelope, Settlement
from eventbus.delivery.policy import Cause, Policies
from eventbus.delivery.publisher import CONFIRMED, Outcome, Publisher
from eventbus.errors import FailedPrecondition, Unavailable
from eventbus.jobs import ledger
from eventbus.jobs.cron import Cron
from eventbus.jobs.ledger import DueDelivery
from eventbus.jobs.republish import Republisher, RetryRules, plan, seeded_jitter, settle
from eventbus.ops.metrics import Metrics, label_values
from tests.bus_client import BusClient
from tests.servers import unique_name
from tests.v2_client import V2Client, message

NOW = 1_700_000_000.0
ORDERS = QueuePolicyConfig(
    "orders.*",
    ack_deadline_seconds=30,
    max_retries=2,
    backoff_min_seconds=1,
    backoff_max_seconds=8,
    dead_letter_queue="orders.dead",
)
CONFIG = Config(delivery=DeliveryConfig(max_retries=3), queues=(ORDERS,))


def rules_of(config: Config = CONFIG, draw: float = 0.5) -> RetryRules:
    """config's rules with every jitter draw fixed (0.5: no jitter at all)."""
    return dataclasses.replace(RetryRules.of(config), jitter=lambda _id: draw)


def due(
    delivery_id: str = "d1",
    *,
    queue: str = "orders.new",
    attempt: int = 1,
    failed_ago: float = 0.0,
    cause: Cause = "nack",
    expires_at: float | None = None,
) -> DueDelivery:
    failed_at = datetime.fromtimestamp(NOW - failed_ago, UTC)
    return DueDelivery(
        delivery_id, "m1", queue, b"body", attempt, expires_at, failed_at, {"k": "v"}, 1.0, cause
    )


# --- plan: pure decisions per policy ---------------------------------------------------------


def test_the_claims_lower_bound_is_the_shortest_wait_of_any_policy() -> None:
    assert RetryRules.of(CONFIG).nack_floor == pytest.approx(0.9)  # 1 s less 10 % jitter
    assert RetryRules.of(Config()).nack_floor == 600  # [delivery] alone: its nack delay
    short_default = Config(delivery=DeliveryConfig(nack_redelivery_delay_seconds=0))
    assert RetryRules.of(dataclasses.replace(short_default, queues=(ORDERS,))).nack_floor == 0


@pytest.mark.parametrize("cause", ["nack", "deadline"])
def test_a_policy_delivery_is_postponed_until_its_backoff_has_passed(cause: Cause) -> None:
    rules = rules_of()
    for attempt, wait in [(1, 1.0), (2, 2.0)]:
        early = plan([due(attempt=attempt, failed_ago=wait - 0.01, cause=cause)], NOW, rules=rules)
        assert early.outcomes == {} and early.retries == []
        assert early.postponed == {"d1": pytest.approx(NOW - (wait - 0.01) + wait)}
        on_time = plan([due(attempt=attempt, failed_ago=wait, cause=cause)], NOW, rules=rules)
        assert on_time.outcomes == {"d1": "retried"} and on_time.postponed == {}
        [(queue, envelope)] = on_time.retries
        assert (queue, envelope.attempt) == ("orders.new", attempt + 1)


def test_the_backoff_is_capped_and_spread_by_the_jitter() -> None:
    low, high = rules_of(draw=0.0), rules_of(draw=0.999999)
    big = Config(queues=(dataclasses.replace(ORDERS, max_retries=10),))
    for rules, factor in [(low, 0.9), (high, 1.1)]:
        rules = dataclasses.replace(rules, policies=Policies(big))
        decided = plan([due(attempt=6, failed_ago=0.0)], NOW, rules=rules)  # 32 s, capped at 8
        assert decided.postponed["d1"] == pytest.approx(NOW + 8 * factor, abs=1e-4)


def test_a_delivery_past_its_policys_max_retries_is_dead_at_once_with_a_copy() -> None:
    last = due(attempt=3, failed_ago=0.0, expires_at=NOW + 60)  # max_retries 2: 3 deliveries
    decided = plan([last], NOW, rules=rules_of())
    assert decided.outcomes == {"d1": "dead"} and decided.dead == [last]
    assert decided.postponed == {} and decided.retries == []
    assert decided.copied == [last]
    fresh = Envelope("m1", b"body", 1, NOW + 60, {"k": "v"}, 1.0)
    assert decided.copies == [("orders.dead", fresh)]


def test_no_copy_without_a_dead_letter_queue_or_to_the_queue_itself() -> None:
    loop = QueuePolicyConfig("loop", max_retries=0, dead_letter_queue="loop")
    plain = QueuePolicyConfig("plain", max_retries=0)
    rules = rules_of(Config(queues=(loop, plain)))
    decided = plan([due("a", queue="loop"), due("b", queue="plain")], NOW, rules=rules)
    assert decided.outcomes == {"a": "dead", "b": "dead"}
    assert decided.copies == [] and decided.copied == []


def test_expiry_comes_before_the_dead_letter_and_the_backoff() -> None:
    expired = due("a", attempt=3, expires_at=NOW)
    waiting = due("b", attempt=1, expires_at=NOW - 1)
    decided = plan([expired, waiting], NOW, rules=rules_of())
    assert decided.outcomes == {"a": "expired", "b": "expired"}
    assert (decided.dead, decided.copies, decided.postponed) == ([], [], {})


def test_queues_without_a_policy_keep_the_fixed_delays_when_a_policy_claims_earlier() -> None:
    rules = rules_of()  # nacks are claimed after 0.9 s, for every queue
    nacked = due("a", queue="payments", failed_ago=1.0)
    decided = plan([nacked], NOW, rules=rules)
    assert decided.postponed == {"a": pytest.approx(NOW - 1.0 + 600)}
    later = plan([due("a", queue="payments", failed_ago=600.0)], NOW, rules=rules)
    assert later.outcomes == {"a": "retried"}
    missed = plan([due("b", queue="payments", cause="deadline")], NOW, rules=rules)
    assert missed.outcomes == {"b": "retried"}  # a missed deadline: at once, as always
    dead = plan([due("c", queue="payments", attempt=4, failed_ago=1.0)], NOW, rules=rules)
    assert (dead.outcomes, dead.copies) == ({"c": "dead"}, [])  # [delivery] max_retries 3


def test_without_policies_the_claims_own_delay_is_trusted_as_before() -> None:
    # the claim waited the exact nack delay by PostgreSQL's clock: no second look
    decided = plan([due(queue="payments", failed_ago=-5.0)], NOW, 3)
    assert decided.outcomes == {"d1": "retried"} and decided.postponed == {}


def test_the_jitter_is_drawn_once_per_delivery() -> None:
    rules = RetryRules.of(CONFIG)  # the real draw, from the delivery's id
    ids = [str(uuid.uuid4()) for _ in range(200)]
    first = plan([due(i, attempt=2) for i in ids], NOW, rules=rules).postponed
    assert all(NOW + 1.8 <= first[i] < NOW + 2.2 for i in ids)
    assert len({round(first[i], 6) for i in ids}) > 150  # spread, not one value
    for i in ids[:20]:  # looked at again later, anywhere: the same due time
        again = plan([due(i, attempt=2)], NOW + 1, rules=rules).postponed[i]
        assert again == first[i]
        on_time = plan([due(i, attempt=2)], first[i], rules=rules)
        assert on_time.outcomes == {i: "retried"}
    assert seeded_jitter(ids[0]) == seeded_jitter(ids[0])
    assert all(0 <= seeded_jitter(i) < 1 for i in ids)


def test_a_dead_letter_waits_when_its_copy_cannot_be_published_now() -> None:
    kept, refused, waiting = (due(i, attempt=3) for i in ("a", "b", "c"))
    retried = due("r", attempt=1, failed_ago=5.0)
    decided = plan([kept, refused, waiting, retried], NOW, rules=rules_of())
    published = [
        CONFIRMED,  # the retry
        CONFIRMED,
        Outcome("refused", FailedPrecondition("no such queue")),
        Outcome("unavailable", Unavailable("RabbitMQ went away")),
    ]
    settled = settle(decided, published)
    assert settled.outcomes == {"a": "dead", "b": "dead", "r": "retried"}
    assert settled.dead == [(kept, None), (refused, None)]
    assert settled.released == ["c"] and settled.waiting == "RabbitMQ went away"


# --- backoff over time, on the mock clock ----------------------------------------------------


class AlwaysGranted:
    """Stands in for the Redis lock: every tick may run."""

    def trouble(self) -> str | None:
        return None

    async def hold(self) -> bool:
        return True

    async def release(self) -> None:
        pass


class Timeline:
    """One message whose every delivery is nacked the moment it is handed out, the claim's two
    rules kept in memory (nacked at least the floor ago, not put back until later), each tick
    deciding with plan() at the mock clock's time."""

    def __init__(self, rules: RetryRules, queue: str) -> None:
        self.rules = rules
        self.open: dict[str, DueDelivery] = {}
        self.put_back: dict[str, float] = {}
        self.delivered: list[tuple[float, float]] = []  # (when, when it was due)
        self.postponements: dict[str, int] = {}
        self.dead: list[DueDelivery] = []
        self.copies: list[tuple[str, Envelope]] = []
        self._hand_out(queue, 1, trio.current_time(), trio.current_time())

    def _hand_out(self, queue: str, attempt: int, now: float, due_at: float) -> None:
        self.delivered.append((now, due_at))
        delivery_id = str(uuid.uuid4())
        failed_at = datetime.fromtimestamp(now, UTC)  # nacked at once
        self.open[delivery_id] = DueDelivery(
            delivery_id, "m", queue, b"x", attempt, None, failed_at, cause="nack"
        )

    def _claimable(self, now: float) -> list[DueDelivery]:
        return [
            d
            for d in self.open.values()
            if d.failed_at.timestamp() + self.rules.nack_floor <= now
            and self.put_back.get(d.id, -math.inf) < now
        ]

    async def tick(self) -> None:
        now = trio.current_time()
        decided = plan(self._claimable(now), now, rules=self.rules)
        for delivery_id, due_at in decided.postponed.items():
            self.put_back[delivery_id] = due_at
            self.postponements[delivery_id] = self.postponements.get(delivery_id, 0) + 1
        for delivery in decided.retried:
            del self.open[delivery.id]
            due_at = self.put_back.get(delivery.id, now)
            self._hand_out(delivery.queue, delivery.attempt + 1, now, due_at)
        for delivery in decided.dead:
            del self.open[delivery.id]
        self.dead += decided.dead
        self.copies += decided.copies


async def test_a_message_nacked_every_time_comes_back_after_each_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = dataclasses.replace(ORDERS, max_retries=5)  # waits 1, 2, 4, 8, 8 s (± 10 %)
    rules = RetryRules.of(Config(queues=(policy,)))  # the real jitter
    interval = 0.25
    timeline = Timeline(rules, "orders.new")
    cron = Cron("republish", timeline.tick, cast(RedisLock, AlwaysGranted()), interval, 30)
    with trio.move_on_after(60):
        await cron.run()
    times = [when for when, _ in timeline.delivered]
    waits = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) == 6  # max_retries 5: six deliveries, then a dead letter
    for wait, nominal in zip(waits, [1, 2, 4, 8, 8], strict=True):
        assert nominal * 0.9 <= wait < nominal * 1.1 + interval
    for when, due_at in timeline.delivered[1:]:
        assert due_at <= when < due_at + interval  # at the first tick once due
    assert set(timeline.postponements.values()) == {1}  # put back once, then due
    [dead] = timeline.dead
    assert dead.attempt == 6
    assert [(q, e.attempt) for q, e in timeline.copies] == [("orders.dead", 1)]


# --- the claim and the republish job against PostgreSQL and RabbitMQ -------------------------


@asynccontextmanager
async def connected(amqp_url: str, postgres_dsn: str) -> AsyncIterator[tuple[Store, Publisher]]:
    config = AmqpConfig(url=amqp_url, namespace="ns", publish_channels=2)
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        broker = Broker(config)
        await broker.connect(10)
        try:
            yield store, Publisher(broker, config)
        finally:
            await broker.close()
            await store.close()


async def take_all(amqp_url: str, queue: str) -> list[Envelope]:
    """(asyncio side) Every message waiting in queue, read as the bus reads it."""
    taken = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        while (received := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(Envelope.from_amqp(received))
    return taken


async def delete_queues(amqp_url: str, *queues: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)


async def handed_out(
    store: Store, queue: str, attempt: int = 1, deadline_in: float = 60, message_id: str = ""
) -> DeliveryRecord:
    now = time.time()
    record = DeliveryRecord(
        str(uuid.uuid4()),
        message_id or str(uuid.uuid4()),
        queue,
        b"order",
        attempt,
        now - 1,
        now + deadline_in,
        None,
    )
    await ledger.write_records(store, [record])
    return record


async def nacked(store: Store, record: DeliveryRecord, ago: float) -> None:
    await ledger.write_settlements(store, [Settlement(record.id, "nack", time.time() - ago)])


async def shift_back(store: Store, seconds: float) -> None:
    """As if seconds had passed: every failure and due time moved that much into the past."""
    interval = f"{seconds} seconds"
    await store.execute(f"UPDATE settlements SET settled_at = settled_at - interval '{interval}'")
    await store.execute(
        f"UPDATE deliveries SET deadline = deadline - interval '{interval}', "
        f"claimed_until = claimed_until - interval '{interval}'"
    )


async def row_of(store: Store, record: DeliveryRecord) -> Any:
    [row] = await store.fetch(
        "SELECT done, outcome, claim_token, extract(epoch FROM claimed_until) AS until "
        "FROM deliveries WHERE id = $1",
        uuid.UUID(record.id),
    )
    return row


async def test_the_claim_tells_a_nack_from_a_missed_deadline(postgres_dsn: str) -> None:
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        try:
            late = await handed_out(store, "q", deadline_in=-5)
            refused = await handed_out(store, "q")
            await nacked(store, refused, ago=2)
            await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, time.time())
            claimed = await ledger.claim_due(store, ledger.new_token(), 10, 1.0, 60)
        finally:
            await store.close()
    assert {d.id: d.cause for d in claimed} == {late.id: "deadline", refused.id: "nack"}


async def test_a_nacked_policy_delivery_comes_back_after_its_backoff_not_before(
    amqp_url: str, postgres_dsn: str
) -> None:
    prefix = unique_name("orders")
    queue, dead_queue, plain = f"{prefix}.new", f"{prefix}-dead", unique_name("plain")
    policy = QueuePolicyConfig(f"{prefix}.*", 30, 1, 5, 60, dead_queue)
    config = Config(delivery=DeliveryConfig(nack_redelivery_delay_seconds=600), queues=(policy,))
    rules = rules_of(config)  # a 5 s backoff exactly; the claim looks after 4.5 s
    marks = unique_name("ns.marks")
    metrics = Metrics("test")
    async with connected(amqp_url, postgres_dsn) as (store, publisher):
        job = Republisher(
            store, publisher, config.delivery, metrics, 60, settlements_queue=marks, rules=rules
        )

        async def tick() -> None:
            await ledger.advance(store, ledger.SETTLEMENTS_PROGRESS, time.time())
            await job.tick()

        first = await handed_out(store, queue)
        await nacked(store, first, ago=4.75)
        missed = await handed_out(store, queue, deadline_in=-4.75)
        other = await handed_out(store, plain)
        await nacked(store, other, ago=4.75)
        await tick()
        assert await aio.call(take_all, amqp_url, queue) == []
        waiting = {r.id: await row_of(store, r) for r in (first, missed, other)}
        for row in waiting.values():
            assert (row["done"], row["claim_token"]) == (False, None)
        failed_at = time.time() - 4.75  # the nacks, and the missed deadline
        assert float(waiting[first.id]["until"]) == pytest.approx(failed_at + 5, abs=0.5)
        assert float(waiting[missed.id]["until"]) == pytest.approx(failed_at + 5, abs=0.5)
        assert float(waiting[other.id]["until"]) == pytest.approx(failed_at + 600, abs=0.5)
        await tick()  # put back: nobody claims them before then
        assert await aio.call(take_all, amqp_url, queue) == []

        await shift_back(store, 0.5)  # 5.25 s after the failures
        await tick()
        retries = await aio.call(take_all, amqp_url, queue)
        assert sorted((r.message_id, r.attempt) for r in retries) == sorted(
            [(first.message_id, 2), (missed.message_id, 2)]
        )
        assert (await row_of(store, first))["outcome"] == "retried"
        assert (await row_of(store, missed))["outcome"] == "retried"
        assert (await row_of(store, other))["done"] is False  # [delivery]: 600 s

        last = await handed_out(store, queue, attempt=2, message_id=first.message_id)
        await nacked(store, last, ago=4.6)  # max_retries 1: dead, without waiting for a backoff
        await tick()
        [copy] = await aio.call(take_all, amqp_url, dead_queue)
        letters = await store.fetch("SELECT message_id::text, attempts FROM dead_letters")
        await aio.call(delete_queues, amqp_url, queue, dead_queue, marks)
    assert (copy.message_id, copy.attempt, copy.body) == (first.message_id, 1, b"order")
    assert [(r["message_id"], r["attempts"]) for r in letters] == [(first.message_id, 2)]
    assert label_values(metrics.dead_lettered) == {queue: 1.0}
    assert label_values(metrics.republished) == {queue: 2.0}


# --- through a real daemon -------------------------------------------------------------------


@pytest.fixture
def orders(make_daemon: Any) -> Iterator[tuple[Any, str, str]]:
    """A daemon whose queues PREFIX.* follow a policy: 2 s ack deadline, 2 retries, backoff
    from 2 s, dead letters also to PREFIX-dead; [delivery] keeps a 600 s nack delay."""
    prefix = unique_name("orders")
    policy = {
        "ack_deadline_seconds": 2,
        "max_retries": 2,
        "backoff_min_seconds": 2,
        "backoff_max_seconds": 60,
        "dead_letter_queue": f"{prefix}-dead",
    }
    daemon = make_daemon(
        delivery={"nack_redelivery_delay_seconds": 600},
        cron={"interval_seconds": 0.2},
        queues={f"{prefix}.*": policy},
    )
    daemon.wait_ready()
    yield daemon, f"{prefix}.new", f"{prefix}-dead"


def dead_letters(postgres_dsn: str, queue: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(postgres_dsn)
        try:
            rows = await connection.fetch(
                "SELECT message_id::text, attempts FROM dead_letters WHERE queue = $1", queue
            )
        finally:
            await connection.close()
        return [dict(row) for row in rows]

    return asyncio.run(fetch())


def test_a_v1_subscriber_nacking_sees_the_backoff_then_the_dead_letter_copy(
    orders: tuple[Any, str, str], backends: Any
) -> None:
    daemon, queue, dead_queue = orders
    v1, v2 = BusClient(daemon.grpc_address), V2Client(daemon.grpc_address)
    (published,) = v2.publish(message(queue, b"order 1"))
    received = v1.subscribe(queue)
    waits = []
    for _ in range(2):
        nacked_at = time.monotonic()
        v1.nack(received.id)
        assert v1.try_subscribe(queue, timeout=1.5) is None  # well inside the backoff
        received = v1.subscribe(queue, timeout=15)
        waits.append(time.monotonic() - nacked_at)
        assert received.data == "order 1"
    v1.nack(received.id)  # the third delivery: max_retries 2
    (copy,) = v2.pull(dead_queue, wait_seconds=10)
    deadline = time.monotonic() + 10
    while not (letters := dead_letters(backends.postgres_dsn, queue)):
        assert time.monotonic() < deadline, "no dead letter recorded"
        time.sleep(0.1)
    assert v1.try_subscribe(queue, timeout=1.0) is None
    v1.close()
    v2.close()
    assert waits[0] >= 2 * 0.9 and waits[1] >= 4 * 0.9  # backoff 2 s, then 4 s (± 10 %)
    assert (copy.message_id, copy.attempt, copy.data) == (published.message_id, 1, b"order 1")
    assert letters == [{"message_id": published.message_id, "attempts": 3}]


def test_a_pull_gets_its_queues_ack_deadline_and_comes_back_after_the_backoff(
    orders: tuple[Any, str, str],
) -> None:
    daemon, queue, _ = orders
    v2 = V2Client(daemon.grpc_address)
    v2.publish(message(queue, b"slow"))
    (held,) = v2.pull(queue, wait_seconds=5)
    span = held.deadline.ToMicroseconds() - held.publish_time.ToMicroseconds()
    assert 1.5e6 <= span <= 4e6  # the policy's 2 s, not [delivery]'s 1800 s
    deadline = held.deadline.ToMicroseconds() / 1e6
    (again,) = v2.pull(queue, wait_seconds=15)
    came_back = time.time()
    assert (again.message_id, again.attempt) == (held.message_id, 2)
    assert came_back >= deadline + 2 * 0.9  # the deadline, then its backoff
    assert v2.acknowledge([again.ack_id]) == []
    v2.close()
