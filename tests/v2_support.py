"""Shared pieces of the v2 tests against real daemons: a quick daemon, polling with a deadline,
the dead letters of a test's database, and collecting what streams receive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest

from eventbus._generated import v2_pb2
from tests.v2_client import StreamHandle, V2Client

T = TypeVar("T")

# A nack comes back at once; delayed messages are looked at five times a second.
QUICK: dict[str, dict[str, Any]] = {
    "delivery": {"nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
}


def quick(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """QUICK with some keys changed or added."""
    merged = {name: dict(table) for name, table in QUICK.items()}
    for name, table in sections.items():
        merged.setdefault(name, {}).update(table)
    return merged


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    started = make_daemon(**QUICK)
    started.wait_ready()
    return started


@pytest.fixture
def v2(daemon: Any) -> Iterator[V2Client]:
    client = V2Client(daemon.grpc_address)
    yield client
    client.close()


def eventually(
    probe: Callable[[], T], wanted: Callable[[T], bool], timeout: float = 8.0, every: float = 0.1
) -> T:
    """probe's first value that wanted accepts; AssertionError with the last one after timeout."""
    deadline = time.monotonic() + timeout
    while not wanted(value := probe()):
        assert time.monotonic() < deadline, f"still {value!r}"
        time.sleep(every)
    return value


def bound_group(v2: V2Client, topic: str, group: str, **first: Any) -> StreamHandle:
    """A stream on the subscriber group `group` of topic, once its queue is bound (the stream
    binds it before it consumes)."""
    stream = v2.stream(group, topic=topic, **first)
    eventually(lambda: consumers(v2, group), lambda n: n >= 1)
    return stream


def consumers(v2: V2Client, queue: str) -> int:
    """How many consumers queue has; 0 while it does not exist."""
    try:
        return int(v2.queue_info(queue).consumers)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return 0
        raise


def dead_letters(postgres_dsn: str, queue: str) -> list[dict[str, Any]]:
    """The dead letters of queue in the test's database, oldest first."""

    async def fetch() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(postgres_dsn)
        try:
            rows = await connection.fetch(
                "SELECT message_id::text, body, attempts, reason, attributes "
                "FROM dead_letters WHERE queue = $1 ORDER BY dead_at",
                queue,
            )
        finally:
            await connection.close()
        return [dict(row) for row in rows]

    return asyncio.run(fetch())


def dead_letters_of(postgres_dsn: str, queue: str, count: int) -> list[dict[str, Any]]:
    """Wait until queue has count dead letters; returns them."""
    return eventually(lambda: dead_letters(postgres_dsn, queue), lambda rows: len(rows) >= count)


def receive_exactly(
    stream: StreamHandle, count: int, settle: float = 0.7
) -> list[v2_pb2.ReceivedMessage]:
    """count messages, then nothing more for settle seconds (AssertionError otherwise)."""
    got = stream.receive(count)
    got += stream.quiet_for(settle)
    assert len(got) == count, f"{len(got)} messages, expected {count}"
    return got


def invalid_ids_reported(stream: StreamHandle, timeout: float = 5) -> list[str]:
    """The invalid_ack_ids of the next response that carries some (responses before it must
    carry no messages)."""
    deadline = time.monotonic() + timeout
    while True:
        response = stream.next_response(max(0.01, deadline - time.monotonic()))
        assert not response.messages, f"unexpected messages: {response.messages}"
        if response.invalid_ack_ids:
            return list(response.invalid_ack_ids)
