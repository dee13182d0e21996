"""RabbitMQ going away under a running daemon: UNAVAILABLE at once, then service again."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.bus_client import BusClient, status_of
from tests.servers import rabbitmqctl


@pytest.fixture
def rabbitmq_restarted_after() -> Iterator[None]:
    yield
    rabbitmqctl("start_app")
    subprocess.run(["rabbitmqctl", "-q", "await_startup"], check=True, timeout=120)


def test_publish_is_unavailable_while_rabbitmq_is_down_and_works_after(
    make_daemon: Any, rabbitmq_restarted_after: None
) -> None:
    daemon = make_daemon(amqp={"reconnect_window_seconds": 60})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    client.publish("outage", "before")

    rabbitmqctl("stop_app")
    started = time.monotonic()
    code, details = status_of(lambda: client.publish("outage", "during", timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "RabbitMQ" in details
    assert time.monotonic() - started < 5
    code, _ = status_of(lambda: client.subscribe("outage", timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert daemon.http_get("/readyz")[0] == 503

    rabbitmqctl("start_app")
    daemon.wait_ready(timeout=60)  # reconnected by itself
    client.publish("outage", "after")
    got = sorted(client.subscribe("outage").data for _ in range(2))
    assert got == ["after", "before"]
    assert "RabbitMQ: reconnected" in daemon.log
