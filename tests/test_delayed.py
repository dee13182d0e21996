"""Delayed publishing against real daemons: timing, batches, restarts, cancel, several nodes,
and a node killed in the middle of a dispatch batch."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from typing import Any

import aio_pika
import asyncpg
import grpc

from tests.bus_client import BusClient, status_of

TICK = 0.2
FAST = {"cron": {"interval_seconds": TICK}}


def started(make_daemon: Any, **overrides: Any) -> tuple[Any, BusClient]:
    daemon = make_daemon(**{**FAST, **overrides})
    daemon.wait_ready()
    return daemon, BusClient(daemon.grpc_address)


def drain(client: BusClient, queue: str, wait: float = 1.0) -> Counter[str]:
    seen: Counter[str] = Counter()
    while (reply := client.try_subscribe(queue, timeout=wait)) is not None:
        client.ack(reply.id)
        seen[reply.data] += 1
    return seen


def test_never_before_due_and_within_a_tick_after(make_daemon: Any) -> None:
    _, client = started(make_daemon)
    before = time.monotonic()
    client.delay_publish("timed", "wake up", delay=2)
    assert client.try_subscribe("timed", timeout=1.5) is None
    reply = client.subscribe("timed", timeout=10)
    waited = time.monotonic() - before
    assert reply.data == "wake up"
    assert 2.0 <= waited < 2.0 + TICK + 0.8  # one tick, plus the calls' own time


def test_zero_delay_publishes_now_and_a_too_long_delay_is_refused(make_daemon: Any) -> None:
    _, client = started(make_daemon, delivery={"max_delay_seconds": 3600})
    client.delay_publish("now", "at once", delay=0)
    assert client.subscribe("now", timeout=2).data == "at once"
    code, details = status_of(lambda: client.delay_publish("now", "x", delay=3601))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "3600" in details


def test_many_delayed_messages_in_one_batch(make_daemon: Any) -> None:
    daemon, client = started(make_daemon)
    sent = [f"d{i}" for i in range(300)]
    for data in sent:
        client.delay_publish("bulk", data, delay=1)
    seen = drain(client, "bulk", wait=3)
    assert sorted(seen) == sorted(sent) and set(seen.values()) == {1}
    metrics = daemon.http_get("/metrics")[1]
    assert 'eventbus_delay_dispatched_total{queue="bulk"} 300.0' in metrics
    assert "eventbus_delay_lateness_seconds_count 300.0" in metrics


def test_delayed_messages_survive_a_daemon_restart(make_daemon: Any) -> None:
    first, client = started(make_daemon)
    client.delay_publish("durable-delay", "still here", delay=3)
    assert first.stop() == 0
    _, client = started(make_daemon)
    assert client.subscribe("durable-delay", timeout=10).data == "still here"


def cli(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_list_and_cancel_a_delayed_message(make_daemon: Any) -> None:
    daemon, client = started(make_daemon)
    client.delay_publish("cancelled", "never", delay=10)  # room for two slow CLI starts
    client.delay_publish("cancelled", "kept", delay=10)
    deadline = time.monotonic() + 8
    while (
        len(
            listed := cli(
                daemon, "delayed", "list", "--queue", "cancelled", "--json"
            ).stdout.splitlines()
        )
        < 2
    ):
        assert time.monotonic() < deadline, "the delayed messages were not recorded"
        time.sleep(0.1)
    rows = [json.loads(line) for line in listed]
    never = next(row for row in rows if row["data"] == "never")
    assert never["target"] == "cancelled" and never["kind"] == "queue"
    result = cli(daemon, "delayed", "cancel", never["id"])
    assert result.returncode == 0, result.stderr
    assert cli(daemon, "delayed", "cancel", never["id"]).returncode == 1  # nothing left
    assert drain(client, "cancelled", wait=12) == Counter({"kept": 1})


def test_two_daemons_dispatch_each_delayed_message_exactly_once(make_daemon: Any) -> None:
    _, first = started(make_daemon)
    _, second = started(make_daemon)
    sent = [f"m{i}" for i in range(400)]
    for i, data in enumerate(sent):
        (first if i % 2 else second).delay_publish("shared", data, delay=2)
    seen = drain(first, "shared", wait=4)
    assert sorted(seen) == sorted(sent)
    assert set(seen.values()) == {1}


async def insert_due_rows(dsn: str, queue: str, count: int) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.copy_records_to_table(
            "delayed_messages",
            columns=["id", "kind", "target", "body", "due_at", "ttl_seconds"],
            records=[
                (uuid.uuid4(), "queue", queue, f"r{i}".encode(), _past(), 0) for i in range(count)
            ],
        )
    finally:
        await connection.close()


def _past() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)


async def count_and_drain(url: str, queue: str, expected: int, patience: float) -> Counter[str]:
    """Consume queue straight from RabbitMQ until `expected` distinct bodies, or patience s."""
    seen: Counter[str] = Counter()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        source = await channel.declare_queue(queue, durable=True)
        arrived: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await source.consume(arrived.put)
        deadline = time.monotonic() + patience
        while len(seen) < expected and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(arrived.get(), 2)
            except TimeoutError:
                continue
            await message.ack()
            seen[message.body.decode()] += 1
    finally:
        await connection.close()
    return seen


async def queue_depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await connection.close()


def test_a_node_killed_in_the_middle_of_a_dispatch_batch_loses_nothing(
    make_daemon: Any, backends: Any
) -> None:
    count = 30_000
    takeover = {"cron": {"interval_seconds": TICK, "lock_ttl_seconds": 2, "claim_seconds": 5}}
    first, _ = started(make_daemon, **takeover)
    asyncio.run(queue_depth(backends.amqp_url, "killed"))  # declare the queue before rows land
    asyncio.run(insert_due_rows(backends.postgres_dsn, "killed", count))
    deadline = time.monotonic() + 30
    while asyncio.run(queue_depth(backends.amqp_url, "killed")) < 300:  # mid first batch
        assert time.monotonic() < deadline, "dispatch never started"
        time.sleep(0.02)
    first.process.send_signal(signal.SIGKILL)
    first.wait_exit(10)
    moved_before_kill = asyncio.run(queue_depth(backends.amqp_url, "killed"))
    assert 0 < moved_before_kill < count

    started(make_daemon, **takeover)  # takes over: lock TTL, then the dead node's claims expire
    seen = asyncio.run(count_and_drain(backends.amqp_url, "killed", count, patience=90))
    assert len(seen) == count  # nothing lost; a message published twice is allowed
    assert sum(seen.values()) - count <= 2000  # at most the one interrupted batch again


async def insert_row(dsn: str, queue: str, body: str, ttl: int) -> str:
    message_id = uuid.uuid4()
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(
            "INSERT INTO delayed_messages (id, kind, target, body, due_at, ttl_seconds) "
            "VALUES ($1, 'queue', $2, $3, $4, $5)",
            message_id,
            queue,
            body.encode(),
            _past(),
            ttl,
        )
    finally:
        await connection.close()
    return str(message_id)


def test_an_unpublishable_delayed_message_is_quarantined_and_listed(
    make_daemon: Any, backends: Any
) -> None:
    daemon, client = started(make_daemon)
    bad = asyncio.run(insert_row(backends.postgres_dsn, "mixed", "never", 10**12))
    for i in range(5):
        asyncio.run(insert_row(backends.postgres_dsn, "mixed", f"ok{i}", 0))
    assert drain(client, "mixed", wait=3) == Counter(f"ok{i}" for i in range(5))
    listed = cli(daemon, "delayed", "list", "--quarantined", "--json").stdout.splitlines()
    [row] = [json.loads(line) for line in listed]
    assert row["id"] == bad and row["data"] == "never"
    assert "PRECONDITION_FAILED" in row["quarantine_reason"] and row["quarantined_at"]
    assert cli(daemon, "delayed", "cancel", bad).returncode == 0
    assert cli(daemon, "delayed", "list", "--json").stdout == ""
    assert 'eventbus_quarantined_total{queue="mixed"} 1.0' in daemon.http_get("/metrics")[1]
