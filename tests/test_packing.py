"""Records and settlements packed into one internal message each, what coalesces them (Packer),
the acks of consumed deliveries written together (Acks), single publishes of one turn written
together (Outbox), and the bookkeeping reading packed messages beside single ones."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from pamqp.commands import Basic

from eventbus.backends import aio
from eventbus.backends.store import Store
from eventbus.delivery import bulk
from eventbus.delivery.acks import Acks
from eventbus.delivery.envelope import (
    ROWS_HEADER,
    DeadlineChange,
    DeliveryRecord,
    Packed,
    Settlement,
    decode_records,
    decode_settlement,
    pack_records,
    pack_settlements,
)
from eventbus.delivery.outbox import Outbox
from eventbus.delivery.packing import Packer
from eventbus.delivery.publisher import until_confirmed
from eventbus.jobs import ledger, quarantine
from tests.test_quarantine import count, record, with_store, work_through

T = TypeVar("T")


NOW = time.time()


async def on_asyncio(scenario: Callable[[], Awaitable[T]]) -> T:
    """Run scenario on the asyncio side of a trio-asyncio loop of its own."""
    async with aio.open_loop(lambda: None):
        return await aio.call(scenario)


def records() -> list[DeliveryRecord]:
    now = NOW
    return [
        DeliveryRecord("a", "m1", "q", b"line\nbreak\x00\xff", 1, now, now + 60, None),
        DeliveryRecord("b", "m2", "q", b"", 3, now, now + 60, now + 5, {"k": "v"}, now - 1),
        DeliveryRecord("c", "m3", "r", b"[not a pack]", 1, now, now + 60, None, dead_reason="x"),
    ]


def test_packed_records_read_back_as_sent() -> None:
    message = pack_records(records())
    assert message.properties.headers == {ROWS_HEADER: 3}
    assert decode_records(message.body) == Packed(records())


def test_one_record_alone_is_written_as_before() -> None:
    alone = records()[2]
    message = pack_records([alone])
    assert message.body == alone.encode() and message.properties.headers is None
    assert decode_records(message.body) == DeliveryRecord.decode(message.body) == alone


@pytest.mark.parametrize(
    "raw",
    [
        b'[{"id":"a","message_id":"m","queue":"q","attempt":1,"delivered_at":1,"deadline":2,'
        b'"expires_at":null,"size":5}]\nabc',  # shorter than it says
        b'[{"id":"a","message_id":"m","queue":"q","attempt":1,"delivered_at":1,"deadline":2,'
        b'"expires_at":null,"size":1}]\nabc',  # longer
        b'[{"id":"a","size":-1}]\n',
        b"[1,2]\n",
        b'[{"id":"a","message_id":"m","queue":"q","attempt":1,"delivered_at":1,"deadline":2,'
        b'"expires_at":null,"size":0,"attributes":{"k":1}}]\n',
    ],
)
def test_a_pack_that_does_not_add_up_is_refused(raw: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode_records(raw)


def test_packed_settlements_read_back_in_order() -> None:
    sent = [
        Settlement(str(uuid.uuid4()), "ack", 10.0),
        DeadlineChange(str(uuid.uuid4()), "deadline", 11.0, 99.0),
        Settlement(str(uuid.uuid4()), "nack", 12.0),
    ]
    message = pack_settlements(sent)
    assert message.properties.headers == {ROWS_HEADER: 3}
    assert decode_settlement(message.body) == Packed(sent)
    assert decode_settlement(pack_settlements(sent[:1]).body) == sent[0]
    with pytest.raises(ValueError):
        decode_settlement(pack_settlements([Settlement("x", "ack", -5.0)] * 2).body)


@dataclass
class Sender:
    """A send for a Packer: records each pack, and waits for `release` while it is set."""

    packs: list[list[int]] = field(default_factory=list)
    release: asyncio.Event | None = None
    fail: set[int] = field(default_factory=set)  # packs holding one of these fail

    async def __call__(self, items: list[int]) -> None:
        self.packs.append(items)
        if self.release is not None:
            await self.release.wait()
        if self.fail & set(items):
            raise RuntimeError(f"pack {items} failed")


async def test_items_of_one_turn_go_in_one_pack_and_the_next_pack_waits_its_turn() -> None:
    async def scenario() -> tuple[list[list[int]], list[int]]:
        sender = Sender(release=asyncio.Event())
        packer: Packer[int] = Packer(sender, in_flight=1)
        answered: list[int] = []

        async def put(item: int) -> None:
            await packer.put(item)
            answered.append(item)

        first = [asyncio.ensure_future(put(i)) for i in range(5)]
        await asyncio.sleep(0.01)  # the first pack is on its way, waiting for release
        later = [asyncio.ensure_future(put(i)) for i in range(5, 8)]
        await asyncio.sleep(0.01)
        assert sender.packs == [[0, 1, 2, 3, 4]] and answered == []
        sender.release.set()
        await asyncio.gather(*first, *later)
        return sender.packs, answered

    packs, answered = await on_asyncio(scenario)
    assert packs == [[0, 1, 2, 3, 4], [5, 6, 7]]
    assert answered == list(range(8))  # answered in the order the queue holds them


async def test_a_failed_pack_fails_each_of_its_callers_and_no_other() -> None:
    async def scenario() -> list[str]:
        sender = Sender(fail={2})
        packer: Packer[int] = Packer(sender, in_flight=2, most=3)
        results = await asyncio.gather(*(packer.put(i) for i in range(6)), return_exceptions=True)
        assert sender.packs == [[0, 1, 2], [3, 4, 5]]
        return [type(r).__name__ for r in results]

    assert await on_asyncio(scenario) == ["RuntimeError"] * 3 + ["NoneType"] * 3


async def test_a_pack_ends_at_most_items_or_with_the_item_that_reaches_most_bytes() -> None:
    async def scenario() -> list[list[int]]:
        sender = Sender()
        packer: Packer[int] = Packer(sender, in_flight=1, most=4, most_bytes=100, size=lambda n: n)
        await asyncio.gather(*(packer.put(n) for n in [1, 1, 1, 1, 1, 60, 50, 1, 200, 1]))
        return sender.packs

    assert await on_asyncio(scenario) == [[1, 1, 1, 1], [1, 60, 50], [1, 200], [1]]


async def test_a_caller_that_leaves_leaves_its_item_in_the_pack() -> None:
    async def scenario() -> list[list[int]]:
        sender = Sender(release=asyncio.Event())
        packer: Packer[int] = Packer(sender, in_flight=1)
        leaving = asyncio.ensure_future(packer.put(1))
        staying = asyncio.ensure_future(packer.put(2))
        await asyncio.sleep(0.01)
        leaving.cancel()
        sender.release.set()
        await staying
        assert leaving.cancelled()
        return sender.packs

    assert await on_asyncio(scenario) == [[1, 2]]


@dataclass
class AckingChannel:
    """An aiormq channel as Acks uses it: the acks written, in order, as (tag, multiple)."""

    written: list[tuple[int, bool]] = field(default_factory=list)
    closed: bool = False

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.closed:
            raise ConnectionError("channel closed")
        self.written.append((tag, multiple))


async def ack_all(acks: Acks, tags: list[int]) -> list[bool]:
    return list(await asyncio.gather(*(acks.ack(tag) for tag in tags)))


async def test_acks_of_one_turn_go_as_one_multiple_ack_below_every_unsettled_delivery() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        channel = AckingChannel()
        acks = Acks(channel)  # type: ignore[arg-type]
        assert await ack_all(acks, [3, 1, 2]) == [True] * 3
        assert await ack_all(acks, [5, 7]) == [True] * 2  # 4 and 6 are still out
        acks.settled(4)  # requeued meanwhile
        assert await ack_all(acks, [8, 6]) == [True] * 2
        return channel.written

    assert await on_asyncio(scenario) == [
        (3, True),  # 1, 2 and 3
        (5, False),
        (7, False),  # 4 and 6 out: each alone
        (8, True),  # 6 and 8 (4 requeued, 5 and 7 acked already)
    ]


async def test_acks_on_a_failed_channel_answer_false() -> None:
    async def scenario() -> list[bool]:
        acks = Acks(AckingChannel(closed=True))  # type: ignore[arg-type]
        return await ack_all(acks, [1, 2])

    assert await on_asyncio(scenario) == [False, False]


class BulkChannel:
    """An aiormq channel as bulk.send uses it; what reaches its write queue can be read."""

    number = 1
    publisher_confirms = True

    def __init__(self) -> None:
        self.delivery_tag = 0
        self.confirmations: dict[int, asyncio.Future[Any]] = {}
        self.message_id_delivery_tag: dict[str, int] = {}
        self.write_queue: asyncio.Queue[Any] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()
        self.closing: asyncio.Future[None] = self.loop.create_future()  # never closes

    async def _on_confirm_frame(self, frame: Any) -> None:  # replaced by bulk.Confirms
        raise AssertionError("aiormq's confirm handler was left in place")

    def _confirm_delivery(self, tag: int, frame: Any) -> None:
        self.confirmations.pop(tag).set_result(frame)

    @property
    def lock(self) -> asyncio.Lock:
        return self._lock

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _split_body(self, body: bytes) -> list[Any]:
        from pamqp.body import ContentBody

        return [ContentBody(body)]


def publish(n: int) -> bulk.Publish:
    return bulk.Publish("", "q", False, b"m%d" % n, Basic.Properties(message_id=f"id{n}"))


async def test_single_publishes_of_one_turn_are_written_together() -> None:
    async def scenario() -> tuple[int, list[int]]:
        channel = BulkChannel()
        outbox = Outbox()
        sends = [outbox.send(channel, publish(n)) for n in range(5)]  # type: ignore[arg-type]
        confirmations = await asyncio.gather(*sends)
        tags = sorted(channel.confirmations)
        assert [channel.confirmations[t] for t in tags] == confirmations  # each its own
        return channel.write_queue.qsize(), tags

    assert await on_asyncio(scenario) == (1, [1, 2, 3, 4, 5])


async def test_the_first_publish_of_a_turn_leaving_does_not_take_the_others_with_it() -> None:
    async def scenario() -> list[int]:
        channel = BulkChannel()
        outbox = Outbox()
        first = asyncio.ensure_future(outbox.send(channel, publish(0)))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # it waits for the rest of the turn
        others = [
            asyncio.ensure_future(outbox.send(channel, publish(n)))  # type: ignore[arg-type]
            for n in (1, 2)
        ]
        first.cancel()
        await asyncio.gather(*others)
        assert first.cancelled()
        return sorted(channel.confirmations)

    assert await on_asyncio(scenario) == [1, 2]  # the others written, the first not


class FakeBroker:
    """What until_confirmed asks of the broker: whether, and once, it blocks publishers."""

    def __init__(self) -> None:
        self.blocked: str | None = None
        self._changed = asyncio.Event()

    def block(self) -> None:
        self.blocked = "memory alarm"
        self._changed.set()

    async def until_blocked(self) -> None:
        while not self.blocked:
            await self._changed.wait()


async def test_confirmations_are_waited_for_until_all_come_a_block_or_the_time_is_up() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        taken = []
        for ending in ("confirmed", "blocked", "timeout"):
            broker = FakeBroker()
            confirmations = [loop.create_future() for _ in range(3)]
            if ending == "confirmed":
                for delay, future in enumerate(confirmations):
                    loop.call_later(0.01 * delay, future.set_result, None)
            elif ending == "blocked":
                loop.call_later(0.02, broker.block)
            started = loop.time()
            await until_confirmed(confirmations, 0.3, broker)  # type: ignore[arg-type]
            taken.append(loop.time() - started)
        return taken

    confirmed, blocked, timed_out = await on_asyncio(scenario)
    assert confirmed < 0.2 and blocked < 0.2 and timed_out >= 0.29


async def test_the_bookkeeping_reads_packed_records_and_quarantines_a_refused_one_alone(
    amqp_url: str, postgres_dsn: str
) -> None:
    good = [record(f"m{i}") for i in range(12)]
    refused = record("far", expires_at=1e19)  # beyond PostgreSQL's timestamps
    bodies = [
        pack_records([*good[:5], refused, *good[5:8]]).body,
        good[8].encode(),  # one alone, as older nodes and single hand-outs write it
        pack_records(good[9:]).body,
        b'[{"id":"x"}]\nnot a pack',
    ]

    async def work(store: Store) -> None:
        async def done() -> bool:
            return await count(store, "deliveries") + await count(store, "quarantine") == 14

        await work_through(amqp_url, store, bodies, decode_records, ledger.write_records, done)
        rows = await store.fetch("SELECT id::text, body FROM deliveries")
        assert {r["id"]: r["body"] for r in rows} == {r.id: r.body for r in good}
        kept = await quarantine.listed(store, None, 10)
        assert sorted(q.body for q in kept) == sorted([refused.encode(), bodies[-1]])

    await with_store(postgres_dsn, work)
