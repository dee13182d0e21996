"""Bookkeeping workers against the real RabbitMQ and PostgreSQL: batches bounded in bytes, a
batch too heavy for PostgreSQL halved, and a failed ack that starts a session again."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.broker import Broker
from eventbus.backends.store import Store
from eventbus.delivery.envelope import DeliveryRecord
from eventbus.jobs import bookkeeping, ledger
from tests.test_quarantine import count, record, with_store, work_through


@dataclass
class Raw:
    body: bytes
    headers: dict[str, Any] | None = None


async def test_a_batch_ends_once_its_bodies_reach_the_byte_bound() -> None:
    send, receive = trio.open_memory_channel[Raw](100)
    for _ in range(20):
        send.send_nowait(Raw(bytes(4 << 20)))  # 4 MiB records: 300 made PostgreSQL give up
    sizes = []
    while batch := await bookkeeping._gather(receive):
        sizes.append(len(batch))
    assert sizes == [4] * 5  # 16 MiB each
    send.send_nowait(Raw(b"x" * 10))
    send.send_nowait(Raw(b"y" * 10))
    assert len(await bookkeeping._gather(receive)) == 2


async def test_a_batch_that_keeps_timing_out_is_halved_while_postgresql_answers(
    amqp_url: str, postgres_dsn: str
) -> None:
    records = [record(f"m{i}") for i in range(50)]
    attempts: list[int] = []

    async def heavy_writer(store: Store, items: Sequence[DeliveryRecord]) -> Any:
        attempts.append(len(items))
        if len(items) > 4:  # as PostgreSQL timing out on a batch too heavy for it
            raise trio.TooSlowError
        return await ledger.write_records(store, items)

    async def work(store: Store) -> None:
        async def done() -> bool:
            return await count(store, "deliveries") == 50

        bodies = [r.encode() for r in records]
        await work_through(amqp_url, store, bodies, DeliveryRecord.decode, heavy_writer, done)
        assert await count(store, "quarantine") == 0

    await with_store(postgres_dsn, work)
    assert attempts[:2] == [50, 50]  # tried whole twice (a timeout may pass), then halved
    assert 25 in attempts


async def test_a_failed_ack_starts_the_session_again(
    amqp_url: str, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = [record(f"m{i}") for i in range(30)]
    brokers: list[Broker] = []
    closed: list[int] = []

    async def closing_writer(store: Store, items: Sequence[DeliveryRecord]) -> Any:
        counts = await ledger.write_records(store, items)
        if not closed:  # the channel goes before the batch is acked
            [broker] = brokers
            channels = list(broker.connection.transport.connection.channels.values())
            for channel in channels:
                await aio.call(channel.close)
            closed.append(len(channels))
        return counts

    original_connect = Broker.connect

    async def connect(self: Broker, window: float) -> None:
        brokers.append(self)
        await original_connect(self, window)

    monkeypatch.setattr(Broker, "connect", connect)  # to reach the worker's connection

    async def work(store: Store) -> None:
        async def done() -> bool:
            return await count(store, "deliveries") == 30

        bodies = [r.encode() for r in records]
        await work_through(amqp_url, store, bodies, DeliveryRecord.decode, closing_writer, done)

    await with_store(postgres_dsn, work)
    assert closed == [1]
