"""The gRPC port against hostile and broken clients: a real daemon, raw HTTP/2 frames over a
plain socket (h2), and a well-behaved grpclib client beside them."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import h2.events
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from prometheus_client.parser import text_string_to_metric_families

from eventbus._generated import mq_grpc, mq_pb2
from tests.bus_client import BusClient

PUBLISH = "/mq.Mq/publish"
HEALTH = "/grpc.health.v1.Health/Check"
REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", PUBLISH),
    (":authority", "eventbus"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def frame(body: bytes, flag: int = 0, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; length may lie about the body."""
    return struct.pack(">BI", flag, len(body) if length is None else length) + body


class RawClient:
    """An HTTP/2 client that sends exactly the frames a test asks for."""

    def __init__(self, port: int, *, preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.events: list[h2.events.Event] = []
        self.closed = False
        if preface:
            self.h2.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, path: str = PUBLISH, end: bool = False) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        headers = [(name, path if name == ":path" else value) for name, value in REQUEST_HEADERS]
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = True) -> None:
        self.h2.send_data(stream_id, data, end_stream=end)
        self.flush()

    def pump(self, timeout: float) -> None:
        """Read what the server sent for up to timeout seconds (less if it closes)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return
        self.events.extend(self.h2.receive_data(data))
        self.flush()

    def status(self, stream_id: int, timeout: float = 10) -> tuple[int, str]:
        """The grpc-status and grpc-message the server ended stream_id with."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.closed:
            for event in self.events:
                headers = getattr(event, "headers", None)
                if getattr(event, "stream_id", None) == stream_id and headers:
                    found = dict(headers)
                    if "grpc-status" in found:
                        return int(found["grpc-status"]), found.get("grpc-message", "")
            self.pump(deadline - time.monotonic())
        raise AssertionError(f"no status for stream {stream_id}: {self.events}")

    def wait_closed(self, timeout: float) -> float:
        """Seconds until the server closed the connection; fails after timeout."""
        started = time.monotonic()
        while not self.closed:
            left = timeout - (time.monotonic() - started)
            assert left > 0, f"connection still open after {timeout} s"
            self.pump(left)
        return time.monotonic() - started

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw_client(port: int, *, preface: bool = True) -> Iterator[RawClient]:
    client = RawClient(port, preface=preface)
    try:
        yield client
    finally:
        client.close()


async def publish_once(port: int, queue: str, seconds: float = 10) -> None:
    channel = Channel("127.0.0.1", port)
    try:
        await mq_grpc.MqStub(channel).publish(
            mq_pb2.PublishRequest(queue=queue, data="hello"), timeout=seconds
        )
    finally:
        channel.close()


def grpc_call(port: int, call: Any) -> Any:
    """Run an asyncio grpclib coroutine function with a channel to the daemon."""

    async def run() -> Any:
        channel = Channel("127.0.0.1", port)
        try:
            return await call(channel)
        finally:
            channel.close()

    return asyncio.run(run())


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def metric(text: str, method: str, code: str) -> float:
    """eventbus_grpc_requests_total for one method and status code in a /metrics page."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "eventbus_grpc_requests_total" and (
                labels.get("method"),
                labels.get("code"),
            ) == (method, code):
                return float(sample.value)
    return 0.0


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    started = make_daemon(
        server={"max_message_bytes": 65536, "request_timeout_seconds": 1.0},
    )
    started.wait_ready()
    return started


def test_malformed_requests_get_a_status_that_says_so(daemon: Any) -> None:
    with raw_client(daemon.grpc_port) as client:
        cases = {
            "malformed protobuf": (frame(b"\xff\xff\xff"), PUBLISH),
            "malformed health request": (frame(b"\x0a\x05ab"), HEALTH),
            "truncated body": (frame(b"\x0a\x01q", length=100), PUBLISH),
            "truncated prefix": (b"\x00\x00\x00", PUBLISH),
            "no message": (b"", PUBLISH),
            "bad flag": (frame(b"", flag=7), PUBLISH),
        }
        streams = {}
        for name, (body, path) in cases.items():
            streams[name] = stream_id = client.open(path, end=not body)
            if body:
                client.send(stream_id, body)
        compressed = client.open()
        client.send(compressed, frame(b"\x0a\x01q", flag=1))
        answers = {name: client.status(stream_id) for name, stream_id in streams.items()}
        compressed_code, _ = client.status(compressed)
    for name, (code, message) in answers.items():
        assert code == Status.INVALID_ARGUMENT.value, (name, code, message)
    assert "malformed PublishRequest" in answers["malformed protobuf"][1]
    assert "ended inside a message" in answers["truncated body"][1]
    assert "carries no message" in answers["no message"][1]
    assert compressed_code == Status.UNIMPLEMENTED.value
    with raw_client(daemon.grpc_port) as bomb:
        bomb.h2.send_headers(1, [*REQUEST_HEADERS, ("x-big", "a" * 20_000)])
        bomb.flush()
        bomb.wait_closed(5)
        refusal = bomb.goaway()
        assert refusal is not None and refusal.error_code != ErrorCodes.NO_ERROR
    assert "Traceback" not in daemon.log


def test_length_over_the_limit_is_refused_before_the_body_is_read(daemon: Any) -> None:
    with raw_client(daemon.grpc_port) as client:
        stream_id = client.open()
        client.send(stream_id, struct.pack(">BI", 0, 3_000_000_000), end=False)
        code, message = client.status(stream_id, timeout=0.9)  # before the request timeout
    assert code == Status.RESOURCE_EXHAUSTED.value
    assert "3000000000 bytes is over the limit of 65536 bytes" in message
    assert "server.max_message_bytes" in message


def test_a_stream_without_its_message_ends_after_the_request_timeout(daemon: Any) -> None:
    with raw_client(daemon.grpc_port) as client:
        silent = client.open()
        half = client.open()
        client.send(half, frame(b"\x0a\x01q" * 10)[:8], end=False)
        started = time.monotonic()
        code, message = client.status(silent)
        assert code == Status.DEADLINE_EXCEEDED.value
        assert "server.request_timeout_seconds" in message
        assert client.status(half)[0] == Status.DEADLINE_EXCEEDED.value
        assert time.monotonic() - started < 5
    code, metrics = daemon.http_get("/metrics")
    assert metric(metrics, "mq.Mq/publish", "DEADLINE_EXCEEDED") == 2


def test_cancelled_and_timed_out_calls_are_counted_as_such(daemon: Any) -> None:
    async def subscribe_with_deadline(channel: Channel) -> None:
        with contextlib.suppress(TimeoutError):  # grpclib's client says so on its side
            await mq_grpc.MqStub(channel).subscribe(
                mq_pb2.SubscribeRequest(queue="nobody-publishes"), timeout=0.5
            )

    async def subscribe_then_leave(channel: Channel) -> None:
        call = asyncio.ensure_future(
            mq_grpc.MqStub(channel).subscribe(mq_pb2.SubscribeRequest(queue="nobody-publishes"))
        )
        await asyncio.sleep(0.5)
        call.cancel()
        await asyncio.sleep(0.5)

    grpc_call(daemon.grpc_port, subscribe_with_deadline)
    grpc_call(daemon.grpc_port, subscribe_then_leave)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = daemon.http_get("/metrics")[1]
        if metric(metrics, "mq.Mq/subscribe", "CANCELLED"):
            break
        time.sleep(0.1)
    assert metric(metrics, "mq.Mq/subscribe", "DEADLINE_EXCEEDED") == 1
    assert metric(metrics, "mq.Mq/subscribe", "CANCELLED") == 1
    assert metric(metrics, "mq.Mq/subscribe", "OK") == 0


def test_idle_connections_and_ping_floods_are_closed(make_daemon: Any) -> None:
    daemon = make_daemon(
        server={"idle_timeout_seconds": 1.0, "keepalive_min_ping_interval_seconds": 5.0}
    )
    daemon.wait_ready()
    with (
        raw_client(daemon.grpc_port, preface=False) as silent,
        raw_client(daemon.grpc_port) as no_stream,
        raw_client(daemon.grpc_port) as pinger,
    ):
        for i in range(10):
            pinger.h2.ping(struct.pack(">Q", i))
        pinger.flush()
        assert pinger.wait_closed(5) < 1
        assert silent.wait_closed(5) < 4
        assert no_stream.wait_closed(5) < 4
        calm = pinger.goaway()
        assert calm is not None and calm.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert calm.additional_data == b"too_many_pings"
        idle = no_stream.goaway()
        assert idle is not None and idle.error_code == ErrorCodes.NO_ERROR
    asyncio.run(publish_once(daemon.grpc_port, "after-idle"))


def test_connections_past_the_cap_are_refused_and_others_still_served(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_connections": 20})
    daemon.wait_ready()

    async def publish_beside_a_crowd() -> int:
        channel = Channel("127.0.0.1", daemon.grpc_port)
        stub = mq_grpc.MqStub(channel)
        try:
            await stub.publish(mq_pb2.PublishRequest(queue="crowd", data="first"), timeout=10)
            crowd = [RawClient(daemon.grpc_port) for _ in range(100)]
            for client in crowd:
                client.pump(0.05)
            await stub.publish(mq_pb2.PublishRequest(queue="crowd", data="second"), timeout=10)
            refused = sum(client.closed for client in crowd)
            for client in crowd:
                client.close()
            return refused
        finally:
            channel.close()

    assert asyncio.run(publish_beside_a_crowd()) == 100 - 19
    time.sleep(0.5)
    asyncio.run(publish_once(daemon.grpc_port, "crowd"))  # slots come back as they close
    refusals = [line for line in daemon.log.splitlines() if "refused a connection" in line]
    assert len(refusals) == 1, refusals


def test_rapid_reset_closes_that_connection_while_others_are_served(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_client_resets": 100, "client_reset_window_seconds": 10.0})
    daemon.wait_ready()
    asyncio.run(publish_once(daemon.grpc_port, "beside-reset"))
    baseline = rss_mib(daemon.process.pid)
    with raw_client(daemon.grpc_port) as attacker:
        attacker.pump(0.2)
        for _ in range(5000):
            stream_id = attacker.h2.get_next_available_stream_id()
            attacker.h2.send_headers(stream_id, REQUEST_HEADERS)
            attacker.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        with contextlib.suppress(OSError):  # closed by the server midway
            attacker.flush()
        asyncio.run(publish_once(daemon.grpc_port, "beside-reset", seconds=5))
        attacker.wait_closed(5)
        calm = attacker.goaway()
        assert calm is not None and calm.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    asyncio.run(publish_once(daemon.grpc_port, "beside-reset", seconds=5))
    assert "streams reset by the client" in daemon.log
    assert rss_mib(daemon.process.pid) < baseline + 50


def test_calls_reset_at_their_deadline_are_not_a_rapid_reset(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_client_resets": 20, "client_reset_window_seconds": 30.0})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    try:
        with ThreadPoolExecutor(20) as pool:  # grpcio resets each call when its deadline passes
            gone = list(pool.map(lambda i: client.try_subscribe(f"poll-{i % 5}", 0.7), range(100)))
        assert gone == [None] * 100
        client.publish("poll-0", "still connected")
        assert client.subscribe("poll-0").data == "still connected"
    finally:
        client.close()
    assert "streams reset by the client" not in daemon.log


def test_memory_comes_back_after_a_thousand_idle_connections(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_connections": 2000, "idle_timeout_seconds": 3.0})
    daemon.wait_ready()
    asyncio.run(publish_once(daemon.grpc_port, "rss"))
    baseline = rss_mib(daemon.process.pid)
    crowd = [RawClient(daemon.grpc_port) for _ in range(1000)]
    for client in crowd:
        client.pump(0.01)
    asyncio.run(publish_once(daemon.grpc_port, "rss"))
    during = rss_mib(daemon.process.pid)
    for client in crowd:
        client.wait_closed(10)  # the idle timeout closes them all
        client.close()
    time.sleep(1)
    after = rss_mib(daemon.process.pid)
    assert after < baseline + 50, (baseline, during, after)
    asyncio.run(publish_once(daemon.grpc_port, "rss"))
    assert "Traceback" not in daemon.log


def test_http_port_bounds_headers_and_idle_connections(daemon: Any) -> None:
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10) as huge:
        huge.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 12_000)
        answer = huge.recv(4096)  # headers not finished, but already over the bound
    assert answer.startswith(b"HTTP/1.1 4"), answer[:80]
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10) as idle:
        started = time.monotonic()
        assert idle.recv(4096) == b""  # closed by the server, without a request
        assert time.monotonic() - started < 9
    assert daemon.http_get("/healthz") == (200, "ok\n")
