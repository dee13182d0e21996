"""A real daemon process against the real servers, driven as a user would drive it."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest

from tests.servers import closed_port

V1_SERVICES = {"mq.Mq", "mq.MqTopic"}


def grpcio_health(address: str, service: str = "") -> int:
    """Health of a service as a grpcio client sees it."""
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        return int(check(HealthCheckRequest(service=service), timeout=5).status)


async def grpclib_health_and_services(port: int) -> tuple[int, set[str]]:
    channel = Channel("127.0.0.1", port)
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(service="mq.Mq"), timeout=5)
        async with ServerReflectionStub(channel).ServerReflectionInfo.open(timeout=5) as stream:
            await stream.send_message(ServerReflectionRequest(list_services=""), end=True)
            listing = await stream.recv_message()
        assert listing is not None
        names = {s.name for s in listing.list_services_response.service}
        return reply.status, names
    finally:
        channel.close()


def test_daemon_serves_and_stops_cleanly_on_sigterm(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    assert grpcio_health(daemon.grpc_address) == HealthCheckResponse.SERVING
    assert grpcio_health(daemon.grpc_address, "mq.MqTopic") == HealthCheckResponse.SERVING
    status, services = asyncio.run(grpclib_health_and_services(daemon.grpc_port))
    assert status == HealthCheckResponse.SERVING
    assert V1_SERVICES | {"grpc.health.v1.Health"} <= services

    code, body = daemon.http_get("/readyz")
    assert (code, json.loads(body)) == (200, {"ready": True, "down": {}})
    assert daemon.http_get("/healthz") == (200, "ok\n")
    code, metrics = daemon.http_get("/metrics")
    assert code == 200 and 'eventbus_dependency_up{dependency="rabbitmq"} 1.0' in metrics
    stats = json.loads(daemon.http_get("/stats")[1])
    assert stats["node"] == "node0" and stats["rabbitmq"]["connected"] is True
    assert [node["name"] for node in stats["nodes"]] == ["node0"]

    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5  # well within the grace period
    log = daemon.log
    assert "SIGTERM received; stopping" in log and "node node0 stopped" in log
    for bad in ("Traceback", "Task was destroyed", "never retrieved", "ERROR"):
        assert bad not in log


def test_sigint_also_stops_with_status_0(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    assert daemon.stop(signal.SIGINT) == 0
    assert "SIGINT received" in daemon.log


def test_sd_notify_ready_after_ports_accept_and_stopping_on_sigterm(
    make_daemon: Any, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        daemon = make_daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        messages = [sock.recv(4096).decode()]
        while messages[-1] != "READY=1":
            messages.append(sock.recv(4096).decode())
        for port in (daemon.grpc_port, daemon.http_port):  # both accept the moment READY arrives
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        first_watchdog = sock.recv(4096).decode()
        daemon.process.send_signal(signal.SIGTERM)
        after = [sock.recv(4096).decode()]
        while after[-1] == "WATCHDOG=1":
            after.append(sock.recv(4096).decode())
        assert daemon.wait_exit(30) == 0
    assert first_watchdog == "WATCHDOG=1"
    assert after[-1] == "STOPPING=1"
    assert set(messages[:-1]) <= {"WATCHDOG=1"}


@pytest.mark.parametrize(
    ("section", "key", "url", "name"),
    [
        (
            "amqp",
            "url",
            "amqp://guest:secret@127.0.0.1:{port}/",
            "RabbitMQ at amqp://guest:***@127.0.0.1:{port}/",
        ),
        (
            "postgres",
            "dsn",
            "postgresql://postgres@127.0.0.1:{port}/x",
            "PostgreSQL at postgresql://postgres@127.0.0.1:{port}/x",
        ),
        ("redis", "url", "redis://127.0.0.1:{port}/0", "Redis at redis://127.0.0.1:{port}/0"),
    ],
)
def test_dependency_not_answering_at_start_exits_after_the_window(
    make_daemon: Any, section: str, key: str, url: str, name: str
) -> None:
    port = closed_port()
    overrides: dict[str, dict[str, Any]] = {section: {key: url.format(port=port)}}
    overrides.setdefault("amqp", {})["reconnect_window_seconds"] = 2
    daemon = make_daemon(**overrides)
    started = time.monotonic()
    assert daemon.wait_exit(30) == 1
    assert time.monotonic() - started >= 2
    errors = [line for line in daemon.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, daemon.log
    assert f"{name.format(port=port)} did not answer within 2 s: " in errors[0]
    assert "Traceback" not in daemon.log
    assert "retrying in" in daemon.log
