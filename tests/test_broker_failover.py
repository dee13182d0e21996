"""Several brokers (amqp.urls): the daemon connects to the first that answers and, on losing it,
moves on to the next within the reconnect window, losing nothing it confirmed.

The "brokers" are TCP forwarders in front of this machine's one RabbitMQ: killing a forwarder
cuts the daemon's connections through it and refuses new ones, as a node going down would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import trio
import trio.testing

from eventbus.backends import broker as broker_module
from eventbus.backends.broker import Broker, broker_order
from eventbus.config import AmqpConfig
from eventbus.errors import DependencyUnavailable
from tests.bus_client import BusClient
from tests.servers import closed_port
from tests.test_faults import Publisher, drain


def test_brokers_are_tried_as_listed_and_the_lost_one_last() -> None:
    urls = ["a", "b", "c"]
    assert broker_order(urls, "in_order") == ["a", "b", "c"]
    assert broker_order(urls, "in_order", after="a") == ["b", "c", "a"]
    assert broker_order(urls, "in_order", after="b") == ["c", "a", "b"]
    assert broker_order(urls, "in_order", after="gone") == ["a", "b", "c"]
    assert broker_order(["a"], "in_order", after="a") == ["a"]


def test_shuffled_brokers_are_shuffled_each_time_and_the_lost_one_still_last() -> None:
    def reverse(listed: list[str]) -> None:
        listed.reverse()

    assert broker_order(["a", "b", "c"], "shuffled", shuffle=reverse) == ["c", "b", "a"]
    assert broker_order(["a", "b", "c"], "shuffled", after="c", shuffle=reverse) == [
        "b",
        "a",
        "c",
    ]
    orders = {tuple(broker_order(["a", "b", "c"], "shuffled")) for _ in range(200)}
    assert len(orders) > 1  # shuffled anew on every call
    assert all(sorted(order) == ["a", "b", "c"] for order in orders)


class ClockJumpingLog(logging.Handler):
    """Moves a mock clock past a deadline while a warning line is written (a slow log)."""

    def __init__(self, clock: trio.testing.MockClock, seconds: float) -> None:
        super().__init__()
        self._clock, self._seconds = clock, seconds

    def emit(self, record: logging.LogRecord) -> None:
        self._clock.jump(self._seconds)


class Unanswering(Broker):
    """A Broker whose every broker refuses at once (no RabbitMQ involved)."""

    async def _open_pair(self, url: str) -> Any:
        raise ConnectionRefusedError(f"{url} refused")


def test_the_window_ending_while_logging_is_dependency_unavailable() -> None:
    """The last attempt fails just inside the window, and the window ends before the pause that
    follows: the pause is no negative sleep (ValueError) but none, and then the daemon gives up
    as it should."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    handler = ClockJumpingLog(clock, 3.0)
    logger = logging.getLogger(broker_module.__name__)
    logger.addHandler(handler)
    config = AmqpConfig(urls=("amqp://guest:guest@127.0.0.1:1/", "amqp://guest:x@127.0.0.1:2/"))

    async def main() -> str:
        with pytest.raises(DependencyUnavailable) as raised:
            await Unanswering(config).connect(5)
        return str(raised.value)

    try:
        message = trio.run(main, clock=clock)
    finally:
        logger.removeHandler(handler)
    assert "did not answer within 5 s" in message and "refused" in message
    assert ":x@" not in message


class Forwarder:
    """A TCP forwarder to RabbitMQ on a port of its own, in threads; kill() closes the port and
    every connection through it at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def kill(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def on_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f":{parts.port}", f":{port}")
    return urlunsplit(parts._replace(netloc=netloc))


def brokers(*urls: str) -> dict[str, str]:
    """amqp.urls for a daemon (set in its environment, it replaces the file's amqp.url)."""
    return {"EVENTBUS_AMQP__URLS": " ".join(urls)}


def redacted(url: str) -> str:
    return url.replace(":guest@", ":***@")


@pytest.fixture
def forwarders(backends: Any) -> Iterator[list[Forwarder]]:
    parts = urlsplit(backends.amqp_url)
    pair = [Forwarder((parts.hostname or "127.0.0.1", parts.port or 5672)) for _ in range(2)]
    yield pair
    for forwarder in pair:
        forwarder.kill()


def stats(daemon: Any) -> dict[str, Any]:
    status, body = daemon.http_get("/stats")
    assert status == 200, body
    return dict(json.loads(body)["rabbitmq"])


def test_a_broker_that_does_not_answer_is_passed_over(make_daemon: Any, backends: Any) -> None:
    dead = on_port(backends.amqp_url, closed_port())
    daemon = make_daemon(env=brokers(dead, backends.amqp_url))
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    client.publish("served", "hello")
    reply = client.subscribe("served")
    client.ack(reply.id)
    assert reply.data == "hello"
    log = daemon.log
    assert f"RabbitMQ at {redacted(dead)}: " in log and "trying the next broker" in log
    assert f"RabbitMQ: connected to {redacted(backends.amqp_url)}" in log
    assert ":guest@" not in log  # passwords never logged
    assert stats(daemon)["broker"] == redacted(backends.amqp_url)


def test_no_broker_answering_exits_naming_them_all(make_daemon: Any, backends: Any) -> None:
    dead = [on_port(backends.amqp_url, closed_port()) for _ in range(2)]
    daemon = make_daemon(env=brokers(*dead), amqp={"reconnect_window_seconds": 2})
    assert daemon.wait_exit(30) == 1
    errors = [line for line in daemon.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, daemon.log
    named = ", ".join(redacted(url) for url in dead)
    assert f"RabbitMQ at {named} did not answer within 2 s" in errors[0]
    assert "Traceback" not in daemon.log


def test_losing_the_broker_under_traffic_moves_to_the_next_and_loses_nothing(
    make_daemon: Any, backends: Any, forwarders: list[Forwarder]
) -> None:
    first, second = forwarders
    urls = [on_port(backends.amqp_url, f.port) for f in forwarders]
    daemon = make_daemon(
        env=brokers(*urls),
        amqp={"reconnect_window_seconds": 20},
        delivery={"ack_deadline_seconds": 5},
        cron={"interval_seconds": 0.2},
    )
    daemon.wait_ready()
    assert stats(daemon)["broker"] == redacted(urls[0])
    assert second.connections == 0
    client = BusClient(daemon.grpc_address)
    publisher = Publisher(client, "failover")
    publisher.start()
    consumed: Counter[str] = Counter()
    try:
        consume(client, consumed, seconds=2)
        before = len(publisher.confirmed)
        first.kill()
        consume(client, consumed, seconds=4)
        assert len(publisher.confirmed) > before + 20  # publishing resumed on the other broker
    finally:
        publisher.stop.set()
        publisher.join(30)
    time.sleep(6)  # past the ack deadline: anything handed out but not acked comes back
    consumed.update(drain(client, "failover", wait=3))

    lost = set(publisher.confirmed) - set(consumed)
    unexpected = set(consumed) - {f"n{i}" for i in range(1, publisher.attempted + 1)}
    assert publisher.other_errors == []  # a publish cut midway is UNAVAILABLE, nothing else
    assert lost == set(), f"lost {len(lost)}: {sorted(lost)[:10]}"
    assert unexpected == set()
    assert second.connections >= 2
    now = stats(daemon)
    assert now["broker"] == redacted(urls[1]) and now["connected"] and now["failovers"] == 1
    log = daemon.log
    assert f"RabbitMQ: connection to {redacted(urls[0])} lost" in log
    assert f"RabbitMQ: reconnected to {redacted(urls[1])} (failover from " in log
    _status, metrics = daemon.http_get("/metrics")
    assert "eventbus_broker_failovers_total 1.0" in metrics


def consume(client: BusClient, consumed: Counter[str], seconds: float) -> None:
    """Take and ack what comes for seconds; calls failing meanwhile are tried again."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            reply = client.try_subscribe("failover", timeout=1)
            if reply is not None:
                client.ack(reply.id)
                consumed[reply.data] += 1
        except grpc.RpcError:
            time.sleep(0.1)
