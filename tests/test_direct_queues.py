"""mq.Mq against a real daemon: delivery, deadlines, retries, dead letters, TTL, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.bus_client import BusClient, status_of

FAST = {
    "delivery": {"ack_deadline_seconds": 2, "nack_redelivery_delay_seconds": 1, "max_retries": 2},
    "cron": {"interval_seconds": 0.2},
}


@pytest.fixture
def bus(make_daemon: Any) -> Iterator[tuple[Any, BusClient]]:
    daemon = make_daemon(**FAST)
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    yield daemon, client
    client.close()


def metric(daemon: Any, name: str, queue: str) -> float:
    text = daemon.http_get("/metrics")[1]
    prefix = f'{name}{{queue="{queue}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


def test_many_messages_each_delivered_once(bus: tuple[Any, BusClient]) -> None:
    daemon, client = bus
    sent = [f"message {i}" for i in range(300)]
    for data in sent:
        client.publish("orders", data)
    received: list[str] = []
    ids: list[str] = []
    lock = threading.Lock()

    def drain() -> None:
        while (reply := client.try_subscribe("orders", timeout=1.5)) is not None:
            client.ack(reply.id)
            with lock:
                received.append(reply.data)
                ids.append(reply.id)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(received) == sorted(sent)
    assert len(set(ids)) == len(ids)
    time.sleep(3)  # past the ack deadline: nothing acked comes back
    assert client.try_subscribe("orders", timeout=1) is None
    assert metric(daemon, "eventbus_published_total", "orders") == 300
    assert metric(daemon, "eventbus_delivered_total", "orders") == 300


def test_unacked_message_comes_back_after_its_deadline_not_before(
    bus: tuple[Any, BusClient],
) -> None:
    _, client = bus
    client.publish("slow", "work")
    first = client.subscribe("slow")
    handed_out = time.monotonic()
    assert client.try_subscribe("slow", timeout=1.2) is None  # still within the 2 s deadline
    again = client.subscribe("slow", timeout=10)
    assert time.monotonic() - handed_out >= 2.0
    assert again.data == "work" and again.id != first.id
    client.ack(again.id)
    assert client.try_subscribe("slow", timeout=3) is None


def test_nacked_message_comes_back_after_the_nack_delay(make_daemon: Any) -> None:
    daemon = make_daemon(
        delivery={"ack_deadline_seconds": 60, "nack_redelivery_delay_seconds": 1},
        cron={"interval_seconds": 0.2},
    )
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    client.publish("retry-me", "payload")
    first = client.subscribe("retry-me")
    client.nack(first.id)
    client.nack(first.id)  # idempotent
    nacked = time.monotonic()
    again = client.subscribe("retry-me", timeout=10)
    assert 1.0 <= time.monotonic() - nacked < 5
    assert again.data == "payload" and again.id != first.id
    client.ack(again.id)
    client.ack(again.id)  # idempotent
    assert client.try_subscribe("retry-me", timeout=2) is None


def run_cli(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_max_retries_plus_one_deliveries_then_a_dead_letter_that_requeues(
    bus: tuple[Any, BusClient],
) -> None:
    daemon, client = bus  # max_retries = 2
    client.publish("fragile", "poison")
    deliveries = []
    while (reply := client.try_subscribe("fragile", timeout=4)) is not None:
        deliveries.append(reply.id)
        client.nack(reply.id)
    assert len(deliveries) == 3 and len(set(deliveries)) == 3

    deadline = time.monotonic() + 10
    while not (listing := run_cli(daemon, "dead-letters", "list", "--json").stdout.strip()):
        assert time.monotonic() < deadline, "no dead letter appeared"
        time.sleep(0.2)
    letter = json.loads(listing)
    assert (letter["queue"], letter["data"], letter["attempts"]) == ("fragile", "poison", 3)
    assert metric(daemon, "eventbus_dead_lettered_total", "fragile") == 1

    result = run_cli(daemon, "dead-letters", "requeue", "--queue", "fragile")
    assert result.returncode == 0 and "requeued 1 dead letters" in result.stderr
    back = client.subscribe("fragile", timeout=5)
    assert back.data == "poison"
    client.ack(back.id)
    assert run_cli(daemon, "dead-letters", "list").stdout == ""


def test_ttl_expires_in_rabbitmq_and_in_the_daemons_buffer(bus: tuple[Any, BusClient]) -> None:
    daemon, client = bus
    client.publish("short-lived", "stale", ttl=1)
    time.sleep(1.5)
    assert client.try_subscribe("short-lived", timeout=1) is None  # RabbitMQ dropped it

    client.publish("prefetched", "warm-up")  # starts this node's consumer for the queue
    client.ack(client.subscribe("prefetched").id)
    client.publish("prefetched", "stale", ttl=1)  # lands in the local buffer at once
    time.sleep(1.5)
    assert client.try_subscribe("prefetched", timeout=1) is None
    assert metric(daemon, "eventbus_expired_total", "prefetched") == 1
    client.publish("prefetched", "fresh", ttl=30)
    assert client.subscribe("prefetched").data == "fresh"


def test_large_and_non_ascii_payloads_arrive_intact(bus: tuple[Any, BusClient]) -> None:
    _, client = bus
    payloads = ["x" * 150_000, "héllo wörld ✓ 你好 🚀", "Ω" * 60_000, "\u0000nul and \n lines"]
    for data in payloads:
        client.publish("blobs", data)
    got = [client.subscribe("blobs") for _ in payloads]
    assert [reply.data for reply in got] == payloads
    assert all(reply.queue == "blobs" for reply in got)


def test_invalid_input_gets_a_status_that_names_it(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_message_bytes": 100_000})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    namespace = daemon.config_path.read_text().split('namespace = "')[1].split('"')[0]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (lambda: client.publish("", "x"), invalid, "queue must not be empty"),
        (lambda: client.publish("q", ""), invalid, "data must not be empty"),
        (lambda: client.publish("q" * 256, "x"), invalid, "at most 255 bytes"),
        (lambda: client.publish("é" * 128, "x"), invalid, "at most 255 bytes"),
        (lambda: client.publish("amq.gen", "x"), invalid, "amq."),
        (lambda: client.publish(f"{namespace}.ack", "x"), invalid, "namespace"),
        (lambda: client.subscribe(""), invalid, "queue must not be empty"),
        (lambda: client.subscribe(f"{namespace}.confirm"), invalid, "namespace"),
        (lambda: client.ack(""), invalid, "id must not be empty"),
        (lambda: client.nack("not-an-id"), invalid, "is not a delivery id"),
        (
            lambda: client.ack("{12345678-1234-1234-1234-123456789012}"),
            invalid,
            "is not a delivery id",
        ),
        (
            lambda: client.publish("q", "x" * 100_001),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "over the limit of 100000 bytes",
        ),
    ]
    for call, code, words in cases:
        got_code, details = status_of(call)
        assert (got_code, words in details) == (code, True), details
    client.publish("q" * 255, "the longest name is fine")
    assert "Traceback" not in daemon.log and daemon.process.poll() is None
    calls = json.loads(daemon.http_get("/stats")[1])["grpc"]["calls"]
    assert not any(key.endswith("/UNKNOWN") or key.endswith("/INTERNAL") for key in calls)


def test_messages_and_unacked_deliveries_survive_a_restart(make_daemon: Any) -> None:
    settings = {"delivery": {"ack_deadline_seconds": 3}, "cron": {"interval_seconds": 0.2}}
    first = make_daemon(**settings)
    first.wait_ready()
    client = BusClient(first.grpc_address)
    for i in range(10):
        client.publish("durable", f"m{i}")
    held = [client.subscribe("durable") for _ in range(3)]  # handed out, never acked
    assert first.stop() == 0
    client.close()

    second = make_daemon(**settings)
    second.wait_ready()
    client = BusClient(second.grpc_address)
    seen = Counter()
    while (reply := client.try_subscribe("durable", timeout=5)) is not None:
        seen[reply.data] += 1
        client.ack(reply.id)
    assert set(seen) == {f"m{i}" for i in range(10)}
    assert all(count == 1 for count in seen.values())
    assert {h.data for h in held} <= set(seen)


def test_a_second_signal_exits_at_once(make_daemon: Any) -> None:
    daemon = make_daemon(server={"shutdown_grace_seconds": 60})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    outcome: list[Any] = []

    def wait_for_a_message() -> None:
        try:
            outcome.append(client.try_subscribe("nobody-publishes", 30))
        except grpc.RpcError as error:
            outcome.append(error.code())

    waiting = threading.Thread(target=wait_for_a_message)
    waiting.start()
    time.sleep(0.5)
    daemon.process.send_signal(15)
    time.sleep(1)
    assert daemon.process.poll() is None  # draining the subscribe in flight
    started = time.monotonic()
    daemon.process.send_signal(15)
    assert daemon.wait_exit(5) == 128 + 15
    assert time.monotonic() - started < 2
    assert "second SIGTERM; exiting at once" in daemon.log
    waiting.join()
    assert outcome == [grpc.StatusCode.UNAVAILABLE]  # the connection went away with the daemon


def test_prefetched_messages_nobody_pulls_go_back_to_rabbitmq(make_daemon: Any) -> None:
    daemon = make_daemon(amqp={"buffer_hold_seconds": 1.0})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    assert client.try_subscribe("held", timeout=0.5) is None  # starts this node's consumer
    for i in range(5):
        client.publish("held", f"h{i}")  # all prefetched into the local buffer at once
    deadline = time.monotonic() + 15
    while metric(daemon, "eventbus_given_back_total", "held") < 5:
        assert time.monotonic() < deadline, "prefetched messages were never given back"
        time.sleep(0.3)
    got = sorted(client.subscribe("held").data for _ in range(5))
    assert got == [f"h{i}" for i in range(5)]  # given back, not lost


def test_stats_count_per_queue(bus: tuple[Any, BusClient]) -> None:
    daemon, client = bus
    for i in range(3):
        client.publish("counted", f"c{i}")
    client.ack(client.subscribe("counted").id)
    client.nack(client.subscribe("counted").id)
    deadline = time.monotonic() + 10
    while True:
        queues = json.loads(daemon.http_get("/stats")[1])["queues"]
        counted = queues.get("counted", {})
        if counted.get("acked") == 1 and counted.get("nacked") == 1:
            break
        assert time.monotonic() < deadline, queues
        time.sleep(0.3)
    assert counted["published"] == 3 and counted["delivered"] >= 2
    assert "eventbus_background_backlog" in daemon.http_get("/metrics")[1]


def test_a_queue_deleted_behind_the_bus_is_declared_again(
    bus: tuple[Any, BusClient], backends: Any
) -> None:
    import asyncio

    import aio_pika

    _, client = bus
    client.publish("ephemeral", "first")
    assert client.subscribe("ephemeral").data == "first"

    async def delete_queue() -> None:
        connection = await aio_pika.connect(backends.amqp_url)
        channel = await connection.channel()
        await channel.queue_delete("ephemeral")
        await connection.close()

    asyncio.run(delete_queue())
    client.publish("ephemeral", "second")  # returned as unroutable, declared, published again
    assert client.subscribe("ephemeral", timeout=5).data == "second"
