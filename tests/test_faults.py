"""Faults injected under running daemons: RabbitMQ, PostgreSQL and Redis going away, the daemon
killed. Each test restarts what it stopped. Jepsen-style checks: every publish that got OK is
delivered (lost = none); duplicates are counted and allowed only where at-least-once allows."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.bus_client import BusClient
from tests.servers import rabbitmqctl, start_rabbitmq_if_down

PG_VERSION = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else ""
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)


def run(command: str) -> None:
    subprocess.run(command, shell=True, check=True, timeout=120, capture_output=True)


@pytest.fixture
def rabbitmq_back() -> Iterator[None]:
    yield
    rabbitmqctl("start_app")
    run("rabbitmqctl -q await_startup")


@pytest.fixture
def postgres_back() -> Iterator[None]:
    yield
    if subprocess.run("pg_isready -q -h 127.0.0.1", shell=True).returncode != 0:
        run(f"pg_ctlcluster --skip-systemctl-redirect {PG_VERSION} main start")


@pytest.fixture
def redis_back() -> Iterator[None]:
    yield
    if subprocess.run("redis-cli ping", shell=True, capture_output=True).returncode != 0:
        run(REDIS_START)
    deadline = time.monotonic() + 30
    while subprocess.run("redis-cli ping", shell=True, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def drain(client: BusClient, queue: str, wait: float = 2.0) -> Counter[str]:
    seen: Counter[str] = Counter()
    while (reply := client.try_subscribe(queue, timeout=wait)) is not None:
        client.ack(reply.id)
        seen[reply.data] += 1
    return seen


class Publisher(threading.Thread):
    """Publishes numbered messages until stopped; remembers which ones got OK."""

    def __init__(self, client: BusClient, queue: str) -> None:
        super().__init__(daemon=True)
        self.client, self.queue = client, queue
        self.confirmed: list[str] = []
        self.failed = 0
        self.attempted = 0
        self.other_errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.attempted += 1
            number = self.attempted
            try:
                self.client.publish(self.queue, f"n{number}", timeout=10)
                self.confirmed.append(f"n{number}")
            except grpc.RpcError as error:
                self.failed += 1
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    self.other_errors.append(f"{error.code()}: {error.details()}")
                time.sleep(0.05)


def publishing_daemon(
    make_daemon: Any, queue: str, window: float
) -> tuple[Any, BusClient, Publisher]:
    """A ready daemon, a client of it, and a Publisher thread already sending to queue."""
    daemon = make_daemon(
        delivery={"ack_deadline_seconds": 5},
        cron={"interval_seconds": 0.2},
        amqp={"reconnect_window_seconds": window},
    )
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    publisher = Publisher(client, queue)
    publisher.start()
    return daemon, client, publisher


def check_nothing_lost(publisher: Publisher, consumed: Counter[str]) -> None:
    """Every publish that got OK was consumed; nothing appeared that was never sent; a failed
    publish said UNAVAILABLE; the outage was seen, and traffic went on around it."""
    lost = set(publisher.confirmed) - set(consumed)
    # A publish that failed may still have reached RabbitMQ (its confirm was lost): allowed.
    unexpected = set(consumed) - {f"n{i}" for i in range(1, publisher.attempted + 1)}
    assert publisher.other_errors == []
    assert publisher.failed > 0
    assert len(publisher.confirmed) > 50
    assert lost == set(), f"lost {len(lost)}: {sorted(lost)[:10]}"
    assert unexpected == set()


def test_rabbitmq_stopped_during_traffic_loses_no_confirmed_message(
    make_daemon: Any, rabbitmq_back: None
) -> None:
    _, client, publisher = publishing_daemon(make_daemon, "jepsen", window=60)
    consumed: Counter[str] = Counter()

    def consume_some(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                reply = client.try_subscribe("jepsen", timeout=1)
                if reply is not None:
                    client.ack(reply.id)
                    consumed[reply.data] += 1
            except grpc.RpcError:
                time.sleep(0.1)

    consume_some(2)
    rabbitmqctl("stop_app")
    consume_some(3)
    rabbitmqctl("start_app")
    run("rabbitmqctl -q await_startup")
    consume_some(5)
    publisher.stop.set()
    publisher.join(30)
    time.sleep(6)  # past the ack deadline: anything handed out but not acked comes back
    consumed.update(drain(client, "jepsen", wait=6))  # records written late still come back

    check_nothing_lost(publisher, consumed)
    duplicates = sum(consumed.values()) - len(consumed)
    assert duplicates <= len(consumed) // 10, duplicates


def test_rabbitmq_away_longer_than_the_window_exits_non_zero(
    make_daemon: Any, rabbitmq_back: None
) -> None:
    daemon = make_daemon(amqp={"reconnect_window_seconds": 3})
    daemon.wait_ready()
    rabbitmqctl("stop_app")
    assert daemon.wait_exit(60) == 1
    errors = [line for line in daemon.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "did not answer within 3 s" in errors[0], daemon.log
    assert "Traceback" not in daemon.log


def test_postgresql_stopped_during_traffic_with_acks(make_daemon: Any, postgres_back: None) -> None:
    daemon = make_daemon(delivery={"ack_deadline_seconds": 4}, cron={"interval_seconds": 0.2})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    run(f"pg_ctlcluster --skip-systemctl-redirect {PG_VERSION} main stop -m fast")
    for i in range(20):
        client.publish("ledger-down", f"m{i}")
    handed = [client.subscribe("ledger-down") for _ in range(20)]
    for reply in handed[:10]:
        client.ack(reply.id)  # bookkeeping waits in RabbitMQ meanwhile
    assert daemon.http_get("/readyz")[0] == 503
    time.sleep(1)
    run(f"pg_ctlcluster --skip-systemctl-redirect {PG_VERSION} main start")
    seen = drain(client, "ledger-down", wait=8)  # the 10 unacked come back after the deadline
    assert seen == Counter({reply.data: 1 for reply in handed[10:]})
    assert drain(client, "ledger-down", wait=5) == Counter()  # acked ones never come back


def test_redis_shut_down_with_delayed_messages_pending(make_daemon: Any, redis_back: None) -> None:
    daemon = make_daemon(cron={"interval_seconds": 0.2})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    for i in range(5):
        client.delay_publish("redis-down", f"d{i}", delay=2)
    run("redis-cli shutdown nosave")
    client.publish("redis-down", "direct traffic is unaffected")
    seen = drain(client, "redis-down", wait=5)
    assert seen == Counter({"direct traffic is unaffected": 1, **{f"d{i}": 1 for i in range(5)}})
    assert "running on row claims alone" in daemon.log


def test_daemon_killed_with_unacked_deliveries_loses_nothing(make_daemon: Any) -> None:
    # A node killed mid-tick holds the cron lock until it expires: keep that short here.
    settings = {
        "delivery": {"ack_deadline_seconds": 3},
        "cron": {"interval_seconds": 0.2, "lock_ttl_seconds": 2},
    }
    first = make_daemon(**settings)
    first.wait_ready()
    client = BusClient(first.grpc_address)
    for i in range(10):
        client.publish("killed-holder", f"k{i}")
    held = {client.subscribe("killed-holder").data for _ in range(4)}  # never acked
    first.process.send_signal(signal.SIGKILL)
    first.wait_exit(10)

    second = make_daemon(**settings)
    second.wait_ready()
    seen = drain(BusClient(second.grpc_address), "killed-holder", wait=6)
    assert set(seen) == {f"k{i}" for i in range(10)}
    assert held <= set(seen)


@pytest.fixture
def rabbitmq_restarted() -> Iterator[None]:
    yield
    start_rabbitmq_if_down()


def test_rabbitmq_killed_hard_during_traffic_loses_no_confirmed_message(
    make_daemon: Any, rabbitmq_restarted: None
) -> None:
    daemon, client, publisher = publishing_daemon(make_daemon, "hard-kill", window=120)
    time.sleep(2)
    run("pkill -9 -x beam.smp")
    time.sleep(1)
    start_rabbitmq_if_down()
    daemon.wait_ready(timeout=60)  # reconnected by itself
    time.sleep(2)  # traffic again after the broker came back
    publisher.stop.set()
    publisher.join(30)
    check_nothing_lost(publisher, drain(client, "hard-kill", wait=6))
