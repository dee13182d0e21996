"""RabbitMQ memory and disk alarms: RabbitMQ blocks the connection that publishes, the daemon
fails publishes at once and says why, and the connection that consumes and declares goes on.

The tests marked alarm raise an alarm on the whole RabbitMQ node (restored in a finally block,
to the value read before); run them alone with `pytest -m alarm tests/test_alarms.py`. The
others are unit tests with fakes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import trio
import trio.testing

from eventbus.api.http import CHECK_TIMEOUT, check_readiness
from eventbus.backends import aio, broker
from eventbus.backends.broker import Blocked, Broker, BrokerUnavailable
from eventbus.config import AmqpConfig
from eventbus.delivery.publisher import _outcome_of_result, _result_of, until_confirmed
from eventbus.errors import Unavailable
from eventbus.ops.metrics import Metrics
from tests.bus_client import BusClient, status_of
from tests.daemon_process import DaemonProcess
from tests.servers import rabbitmqctl, unique_name

ALARM_WATERMARK = "0.0000001"
ALARM_DISK_LIMIT = "1000GB"


def rabbitmq_eval(expression: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", "eval", expression],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


@contextmanager
def memory_alarm() -> Iterator[None]:
    """A memory alarm on the RabbitMQ node; the watermark read first is put back after."""
    watermark = rabbitmq_eval("vm_memory_monitor:get_vm_memory_high_watermark().")
    if watermark.startswith("{absolute,"):
        restore = ["absolute", watermark.removeprefix("{absolute,").rstrip("}")]
    else:
        assert float(watermark) > 0.001, f"an alarm watermark was left behind: {watermark}"
        restore = [watermark]
    rabbitmqctl("set_vm_memory_high_watermark", ALARM_WATERMARK)
    try:
        yield
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", *restore)


@contextmanager
def disk_alarm() -> Iterator[None]:
    """A disk alarm on the RabbitMQ node; the free-disk limit read first is put back after."""
    limit = rabbitmq_eval("rabbit_disk_monitor:get_disk_free_limit().")
    assert int(limit) < 10**12, f"an alarm disk limit was left behind: {limit}"
    rabbitmqctl("set_disk_free_limit", ALARM_DISK_LIMIT)
    try:
        yield
    finally:
        rabbitmqctl("set_disk_free_limit", limit)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"waited {timeout} s for {what}")


def stats(daemon: DaemonProcess) -> dict[str, Any]:
    return dict(json.loads(daemon.http_get("/stats")[1]))


def metric(daemon: DaemonProcess, name: str) -> float:
    for line in daemon.http_get("/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def blocked(daemon: DaemonProcess) -> str | None:
    return stats(daemon)["rabbitmq"]["blocked"]  # type: ignore[no-any-return]


def assert_connection_kept(daemon: DaemonProcess) -> None:
    rabbitmq = stats(daemon)["rabbitmq"]
    assert rabbitmq["connected"] and rabbitmq["reconnects"] == {}
    assert rabbitmq["connections"] == {"publish": "open", "consume": "open"}
    assert "connection lost" not in daemon.log and "CHANNEL_ERROR" not in daemon.log


@pytest.mark.alarm
def test_a_memory_alarm_fails_publishes_at_once_and_says_so(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("alarmed")
    client.publish(queue, "before")
    with memory_alarm():
        assert wait_until(lambda: blocked(daemon), 10, "the node to see the alarm")
        assert blocked(daemon) == "low on memory"
        # Within a 1 s deadline: a publish that waited for the alarm would be DEADLINE_EXCEEDED.
        code, details = status_of(lambda: client.publish(queue, "during", timeout=1))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "low on memory" in details and "not stored" in details
        status, body = daemon.http_get("/readyz")
        assert status == 200
        assert json.loads(body)["degraded"] == {"rabbitmq": "blocked: low on memory"}
        assert metric(daemon, "eventbus_broker_blocked") == 1
        assert metric(daemon, "eventbus_broker_blocks_total") >= 1
    wait_until(lambda: blocked(daemon) is None, 30, "the node to see the alarm end")
    assert metric(daemon, "eventbus_broker_blocked") == 0
    assert json.loads(daemon.http_get("/readyz")[1]) == {"ready": True, "down": {}}
    assert client.subscribe(queue, timeout=10).data == "before"
    assert client.try_subscribe(queue, timeout=3) is None  # no copy of the refused one
    assert "blocking publishers (low on memory)" in daemon.log
    assert "no longer blocking publishers after" in daemon.log
    assert_connection_kept(daemon)
    client.publish(queue, "after")
    assert client.subscribe(queue, timeout=10).data == "after"


@pytest.mark.alarm
def test_pulls_and_acks_go_on_during_a_memory_alarm(make_daemon: Any) -> None:
    """Records and settlements go straight to PostgreSQL while publishers are blocked: the acked
    message never comes back, the one left unacked does after its deadline."""
    daemon = make_daemon(delivery={"ack_deadline_seconds": 2}, cron={"interval_seconds": 0.2})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("alarmed")
    for i in range(3):
        client.publish(queue, f"m{i}")
    with memory_alarm():
        wait_until(lambda: blocked(daemon), 10, "the node to see the alarm")
        acked = client.subscribe(queue, timeout=5)
        client.ack(acked.id, timeout=5)
        left = client.subscribe(queue, timeout=5)
    assert (acked.data, left.data) == ("m0", "m1")
    later = []
    while (delivered := client.try_subscribe(queue, timeout=8)) is not None:
        later.append(delivered.data)
        client.ack(delivered.id)
    assert sorted(later) == ["m1", "m2"]
    assert_connection_kept(daemon)


class Traffic:
    """Clients publishing, delaying and pulling in threads; every status code counted."""

    def __init__(self, daemon: DaemonProcess, queue: str) -> None:
        self.client = BusClient(daemon.grpc_address)
        self.queue = queue
        self.codes: Counter[str] = Counter()
        self.details: list[str] = []
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(call,))
            for call in (self._publish, self._delay, self._pull)
        ]

    def _publish(self) -> None:
        self.client.publish(self.queue, "p", timeout=10)

    def _delay(self) -> None:
        self.client.delay_publish(self.queue, "d", delay=1, timeout=10)

    def _pull(self) -> None:
        delivered = self.client.try_subscribe(self.queue, timeout=1)
        if delivered is not None:
            self.client.ack(delivered.id, timeout=10)

    def _loop(self, call: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                call()
                self.codes["OK"] += 1
            except grpc.RpcError as error:
                self.codes[error.code().name] += 1
                self.details.append(f"{error.code().name}: {error.details()}")
                time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        self.client.close()


@pytest.mark.alarm
def test_a_disk_alarm_under_traffic_keeps_the_connection(make_daemon: Any) -> None:
    daemon = make_daemon(cron={"interval_seconds": 0.5})
    daemon.wait_ready()
    with Traffic(daemon, unique_name("traffic")) as traffic:
        time.sleep(2)
        with disk_alarm():
            assert wait_until(lambda: blocked(daemon), 30, "the node to see the alarm")
            during = blocked(daemon)
            time.sleep(12)  # gauges refresh their backlog counts twice meanwhile
        wait_until(lambda: blocked(daemon) is None, 30, "the node to see the alarm end")
        ok_before = traffic.codes["OK"]
        time.sleep(6)
    assert during == "low on disk"
    assert set(traffic.codes) <= {"OK", "UNAVAILABLE"}, traffic.details[-5:]
    assert traffic.codes["UNAVAILABLE"] > 0 and traffic.codes["OK"] > ok_before
    assert any("low on disk" in d for d in traffic.details)
    assert_connection_kept(daemon)


@pytest.mark.alarm
def test_delayed_messages_and_retries_due_during_an_alarm_arrive_once(
    make_daemon: Any,
) -> None:
    """Delayed messages and a retry fall due while RabbitMQ blocks publishers: each arrives
    once after the alarm, also after their claims would have run out."""
    daemon = make_daemon(
        delivery={"ack_deadline_seconds": 2},
        cron={"interval_seconds": 0.2, "claim_seconds": 3},
    )
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("alarmed")
    delayed = [f"d{i}" for i in range(30)]
    for i, data in enumerate(delayed):
        client.delay_publish(queue, data, delay=2 + i % 5)
    client.publish(queue, "retried")
    assert client.subscribe(queue, timeout=5).data == "retried"  # not acked: retried later
    with memory_alarm():
        wait_until(lambda: blocked(daemon), 10, "the node to see the alarm")
        time.sleep(9)  # everything falls due meanwhile, and the claims run out twice
    seen: Counter[str] = Counter()
    while (delivered := client.try_subscribe(queue, timeout=8)) is not None:
        seen[delivered.data] += 1
        client.ack(delivered.id)
    assert seen == Counter({**dict.fromkeys(delayed, 1), "retried": 1})
    assert_connection_kept(daemon)


# Unit tests: no server.


def test_a_blocked_broker_refuses_publishes_and_says_why() -> None:
    metrics = Metrics("n")
    bus = Broker(AmqpConfig(), metrics)
    bus.refuse_while_blocked()  # not blocked: nothing happens
    bus._on_blocked("low on disk")
    with pytest.raises(Blocked) as refused:
        bus.refuse_while_blocked()
    assert "(low on disk)" in refused.value.message and "not stored" in refused.value.message
    assert metrics.broker_blocked._value.get() == 1
    bus._on_unblocked()
    assert bus.blocked is None and metrics.broker_blocked._value.get() == 0
    bus.refuse_while_blocked()


async def test_ping_is_degraded_while_blocked_and_down_while_disconnected() -> None:
    bus = Broker(AmqpConfig())
    with pytest.raises(BrokerUnavailable):
        await bus.ping()
    bus._up = True
    bus._connections = {broker.CONSUME: object(), broker.PUBLISH: object()}  # type: ignore[dict-item]
    assert await bus.ping() is None
    bus._on_blocked("low on memory")
    assert await bus.ping() == "blocked: low on memory"


async def test_readiness_separates_down_from_degraded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def well() -> None:
        return None

    async def degraded() -> str:
        return "blocked: low on memory"

    async def silent() -> None:
        await trio.sleep_forever()

    readiness = await check_readiness({"a": well, "rabbitmq": degraded, "redis": silent})
    assert readiness.down == {"redis": "timed out"}
    assert readiness.degraded == {"rabbitmq": "blocked: low on memory"}
    assert readiness.body() == {
        "ready": False,
        "down": {"redis": "timed out"},
        "degraded": {"rabbitmq": "blocked: low on memory"},
    }
    assert trio.current_time() == pytest.approx(CHECK_TIMEOUT)
    assert (await check_readiness({"a": well})).body() == {"ready": True, "down": {}}


class FakeUnderlay:
    """What watch_blocking wraps on aiormq's connection: the two private handlers."""

    def __init__(self) -> None:
        self.handled: list[str] = []

    async def _Connection__handle_connection_blocked(self, frame: Any) -> None:
        self.handled.append("blocked")

    async def _Connection__handle_connection_unblocked(self, frame: Any) -> None:
        self.handled.append("unblocked")


class FakeFrame:
    reason = "low on memory"


async def test_watch_blocking_calls_back_and_keeps_aiormq_handling() -> None:
    underlay = FakeUnderlay()
    connection: Any = type("C", (), {"transport": type("T", (), {"connection": underlay})})()
    seen: list[str] = []
    broker.watch_blocking(connection, seen.append, lambda: seen.append("unblocked"))
    await underlay._Connection__handle_connection_blocked(FakeFrame())
    await underlay._Connection__handle_connection_unblocked(FakeFrame())
    assert seen == ["low on memory", "unblocked"]
    assert underlay.handled == ["blocked", "unblocked"]


async def test_a_block_ends_the_wait_for_confirms_without_cancelling_them() -> None:
    async def wait_then_block(bus: Broker) -> asyncio.Future[Any]:
        confirmation: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.2, bus._on_blocked, "low on disk")
        await until_confirmed([confirmation], 30, bus)
        return confirmation

    async with aio.open_loop(lambda: None):
        bus = Broker(AmqpConfig())
        confirmation = await aio.call(wait_then_block, bus)
        outcome = _outcome_of_result(_result_of(confirmation, 5, bus.blocked))
    assert not confirmation.done()  # still RabbitMQ's to confirm: not cancelled
    assert outcome is not None and outcome.status == "unavailable"
    assert outcome.pending is confirmation
    assert isinstance(outcome.error, Unavailable) and "may have been stored" in outcome.reason


def test_a_message_never_sent_while_blocked_is_not_stored() -> None:
    outcome = _outcome_of_result(_result_of(None, 5, "low on memory"))
    assert outcome is not None and outcome.status == "unavailable" and outcome.pending is None
    assert "not stored" in outcome.reason
