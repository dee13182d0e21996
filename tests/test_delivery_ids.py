"""Signed delivery ids: an ack or nack of an id the bus never issued is refused, nothing stored."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import grpc

from eventbus.delivery.ids import DeliveryIds
from eventbus.errors import InvalidArgument
from tests.bus_client import BusClient, status_of

KEY = b"k" * 32


def test_an_issued_id_is_a_canonical_version_8_uuid_and_checks() -> None:
    ids = DeliveryIds(KEY)
    issued = {ids.issue() for _ in range(1000)}
    assert len(issued) == 1000
    for value in issued:
        parsed = uuid.UUID(value)
        assert str(parsed) == value and parsed.version == 8
        assert ids.check(value) == value


def test_made_up_and_tampered_ids_are_refused() -> None:
    ids = DeliveryIds(KEY)
    issued = ids.issue()
    tampered = issued[:-1] + ("0" if issued[-1] != "0" else "1")
    for value in (str(uuid.uuid4()), tampered, DeliveryIds(b"other key").issue()):
        try:
            ids.check(value)
        except InvalidArgument as error:
            assert "was not issued by this bus" in error.message
        else:
            raise AssertionError(f"{value} was accepted")


async def _settlements_of(dsn: str, ids: list[str]) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        sql = "SELECT count(*) FROM settlements WHERE delivery_id = ANY($1::uuid[])"
        return int(await connection.fetchval(sql, ids))
    finally:
        await connection.close()


def test_acks_of_made_up_ids_are_refused_and_leave_nothing_behind(
    make_daemon: Any, postgres_dsn: str
) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    made_up = [str(uuid.uuid4()) for _ in range(2)]
    for call, value in zip((client.ack, client.nack), made_up, strict=True):
        code, details = status_of(lambda call=call, value=value: call(value))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "was not issued by this bus" in details
    client.publish("ids", "real")
    reply = client.subscribe("ids")
    client.ack(reply.id)  # a real one is taken, and counted once record and ack are written
    deadline = time.monotonic() + 10
    while 'eventbus_acked_total{queue="ids"} 1.0' not in daemon.http_get("/metrics")[1]:
        assert time.monotonic() < deadline, "the real ack was never written"
        time.sleep(0.2)
    assert asyncio.run(_settlements_of(postgres_dsn, made_up)) == 0
    client.close()
