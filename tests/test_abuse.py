"""A hostile and careless client against a running daemon: every class of bad input, floods of
queues and subscribers, the broker dropping the connection under many consumers. Afterwards the
daemon still serves, answered every bad call with the status code that names the problem, and
every message accepted before, during and after was delivered exactly once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aio_pika
import grpc
import pytest

from tests import servers
from tests.bus_client import BusClient, status_of
from tests.conftest import Backends

HONEST = "honest"
CAP = 10  # queues consumed at once
MAX_BYTES = 64 * 1024
FAST = {
    "delivery": {"ack_deadline_seconds": 3, "nack_redelivery_delay_seconds": 1},
    "cron": {"interval_seconds": 0.2},
    "server": {"max_message_bytes": MAX_BYTES},
    "amqp": {"max_consumed_queues": CAP, "consumers_per_queue": 2, "consumer_idle_seconds": 5},
}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Bad:
    """One bad call and the status code it must get."""

    name: str
    call: Callable[[BusClient], Any]
    expected: grpc.StatusCode


def raw_call(client: BusClient, method: str, payload: bytes) -> Any:
    """A call whose request body is payload, bytes no protobuf encoder would write."""
    call = client.channel.unary_unary(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    return call(payload, timeout=5)


U64 = 2**64 - 1
BAD_CALLS = [
    Bad("non-ASCII queue", lambda c: c.publish("é", "x"), INVALID),
    Bad("trailing newline", lambda c: c.publish("queue\n", "x"), INVALID),
    Bad("NUL in queue", lambda c: c.publish("q\x00", "x"), INVALID),
    Bad("subscribe non-ASCII", lambda c: c.subscribe("ümlaut", timeout=5), INVALID),
    Bad("subscribe control", lambda c: c.subscribe("a\tb", timeout=5), INVALID),
    Bad("group non-ASCII", lambda c: c.topic_subscribe("t", "grüppe", timeout=5), INVALID),
    Bad("topic amq.", lambda c: c.topic_publish("amq.direct", "x"), INVALID),
    Bad("256-byte name", lambda c: c.publish("q" * 256, "x"), INVALID),
    Bad("empty data", lambda c: c.publish(HONEST, ""), INVALID),
    Bad("huge TTL", lambda c: c.publish(HONEST, "x", ttl=U64), INVALID),
    Bad("TTL over ten years", lambda c: c.publish(HONEST, "x", ttl=315_360_001), INVALID),
    Bad("huge delay", lambda c: c.delay_publish(HONEST, "x", U64), INVALID),
    Bad("delayed huge TTL", lambda c: c.delay_publish(HONEST, "x", 1, ttl=U64), INVALID),
    Bad("delayed bad name", lambda c: c.delay_publish("é", "x", 1), INVALID),
    Bad("topic delayed huge TTL", lambda c: c.topic_delay_publish("t", "x", 1, U64), INVALID),
    Bad("garbage id", lambda c: c.ack("garbage"), INVALID),
    Bad("made-up id", lambda c: c.nack(str(uuid.uuid4())), INVALID),
    Bad("malformed protobuf", lambda c: raw_call(c, "/mq.Mq/publish", b"\xff\xff\xff"), INVALID),
    Bad(
        "string not UTF-8",
        lambda c: raw_call(c, "/mq.Mq/publish", b"\x0a\x02q1\x12\x02\xff\xfe"),
        INVALID,
    ),
    Bad(
        "over the size limit",
        lambda c: c.publish(HONEST, "x" * (MAX_BYTES + 1)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
]


async def _declare_with_other_arguments(amqp_url: str, queue: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, arguments={"x-max-length": 5})


def _connections(vhost: str) -> list[tuple[str, int]]:
    """(pid, channels) of every connection to vhost."""
    rows = servers.connections(vhost, "pid", "channels")
    return [(pid, int(channels)) for pid, channels in rows if channels.isdigit()]


def _close_connections(vhost: str) -> None:
    for pid, _ in _connections(vhost):
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "closed by the abuse test"],
            capture_output=True,
            timeout=60,
        )


class Honest:
    """A well-behaved client publishing numbered messages; remembers what was accepted."""

    def __init__(self, client: BusClient) -> None:
        self.client = client
        self.accepted: Counter[str] = Counter()
        self._lock = threading.Lock()

    def publish(self, data: str) -> None:
        self.client.publish(HONEST, data)
        with self._lock:
            self.accepted[data] += 1

    def delay_publish(self, data: str, delay: int) -> None:
        self.client.delay_publish(HONEST, data, delay)
        with self._lock:
            self.accepted[data] += 1

    def drain(self, patience: float) -> Counter[str]:
        """Subscribe and ack until everything accepted came, then a little longer."""
        received: Counter[str] = Counter()
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            reply = self.client.try_subscribe(HONEST, timeout=2)
            if reply is not None:
                self.client.ack(reply.id)
                received[reply.data] += 1
            elif received == self.accepted:
                break
        return received


@pytest.fixture
def abused(make_daemon: Any) -> Iterator[tuple[Any, BusClient, Honest]]:
    daemon = make_daemon(**FAST)
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    yield daemon, client, Honest(client)
    client.close()


def test_every_bad_call_gets_the_status_that_names_it_and_loses_nothing(
    abused: tuple[Any, BusClient, Honest], amqp_url: str
) -> None:
    daemon, client, honest = abused
    for i in range(10):
        honest.publish(f"before {i}")
    wrong = {}
    for bad in BAD_CALLS:
        code, details = status_of(lambda bad=bad: bad.call(client))
        if code != bad.expected:
            wrong[bad.name] = f"{code.name}: {details}"
        honest.publish(f"during {bad.name}")
    assert wrong == {}

    # bodies a PostgreSQL text column cannot hold go through the bookkeeping and the delay job
    honest.publish("NUL \x00 inside")
    honest.delay_publish("delayed NUL \x00 inside", 1)
    reply = client.subscribe(HONEST)
    client.nack(reply.id)  # its retry goes through the republish job's batch with the rest

    # a queue that exists with other arguments: refused at once, not after the deadline
    asyncio.run(_declare_with_other_arguments(amqp_url, "preexisting"))
    code, _ = status_of(lambda: client.publish("preexisting", "x"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    started = time.monotonic()
    code, details = status_of(lambda: client.subscribe("preexisting", timeout=8))
    assert (code, time.monotonic() - started < 5) == (grpc.StatusCode.FAILED_PRECONDITION, True)
    assert "preexisting" in details

    for i in range(10):
        honest.publish(f"after {i}")
    received = honest.drain(patience=60)
    missing, extra = honest.accepted - received, received - honest.accepted
    assert (missing, extra) == (Counter(), Counter())
    _assert_still_serving(daemon, client)


@pytest.mark.own_vhost
def test_floods_of_queues_subscribers_and_a_dropped_connection_leave_it_serving(
    abused: tuple[Any, BusClient, Honest], backends: Backends
) -> None:
    daemon, client, honest = abused
    vhost = backends.amqp_url.rsplit("/", 1)[1]
    honest.publish("before the floods")
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: client.publish(f"flood-{i}", "x"), range(1000)))
    assert _channels(vhost) < 100  # a shared publishing pool, not channels per queue

    def subscribe_briefly(i: int) -> grpc.StatusCode:
        return status_of(lambda: client.subscribe(f"empty-{i}", timeout=1))[0]

    with ThreadPoolExecutor(64) as pool:
        codes = Counter(pool.map(subscribe_briefly, range(2000)))
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0  # past amqp.max_consumed_queues
    assert _channels(vhost) <= CAP * 2 + 100

    honest.publish("between the floods")
    with ThreadPoolExecutor(16) as pool:  # many consumers running while RabbitMQ drops us
        waiting = [
            pool.submit(lambda i=i: client.try_subscribe(f"flood-{i}", timeout=8))
            for i in range(30)
        ]
        time.sleep(2)
        _close_connections(vhost)
        for future in waiting:
            future.exception()  # any answer will do, as long as there is one
    _wait_reconnected(daemon)
    daemon.wait_ready(timeout=30)
    honest.publish("after the floods")
    received = honest.drain(patience=60)
    assert received == honest.accepted
    _assert_still_serving(daemon, client)


def _wait_reconnected(daemon: Any, timeout: float = 30) -> None:
    """Until the daemon has noticed the dropped connection and made a new one (before that,
    /readyz may still say ready on the old one)."""
    deadline = time.monotonic() + timeout
    while not json.loads(daemon.http_get("/stats")[1])["rabbitmq"]["reconnects"]:
        assert time.monotonic() < deadline, "the daemon never reconnected"
        time.sleep(0.2)


def _channels(vhost: str) -> int:
    return sum(channels for _, channels in _connections(vhost))


def _assert_still_serving(daemon: Any, client: BusClient) -> None:
    assert daemon.process.poll() is None
    assert "Failed to handle cancellation" not in daemon.log  # grpclib's complaint, per call
    client.publish("still", "serving")
    assert client.subscribe("still").data == "serving"
    metrics = daemon.http_get("/metrics")[1]
    internal = [line for line in metrics.splitlines() if 'code="INTERNAL"' in line]
    assert internal == [], internal
    failures = [
        line
        for line in metrics.splitlines()
        if line.startswith("eventbus_task_failures_total") and not line.endswith(" 0.0")
    ]
    assert failures == [], failures
