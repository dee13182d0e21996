"""The gRPC port under attack: how long other clients wait, and what the daemon's memory does.

Usage: python bench/bench_transport.py [SOURCE_DIR [RESETS]]   (defaults: this checkout, 20000)

Starts `python -m eventbus serve` from SOURCE_DIR (so an older checkout can be measured the same
way) on a vhost, database and Redis prefix of its own, all on loopback, then:
- idle connections: RSS of the daemon before, while 1,000 connections sit idle (HTTP/2 preface
  sent, no stream), and 3 s after they are closed;
- rapid reset: one connection sends RESETS HEADERS+RST_STREAM pairs as fast as it can while
  another client calls grpc.health.v1.Health/Check in a loop; prints the slowest and median
  Check (the event loop's lag as a client sees it; a Check that got no answer within 5 s
  counts as 5 s), how the attacking connection ended, and RSS before and after.
Every request loop is bounded in count and time; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_direct import bench_backends  # noqa: E402
from tests.daemon_process import to_toml  # noqa: E402
from tests.servers import free_port  # noqa: E402

RESETS = 20_000
PROBE_TIMEOUT = 5.0
IDLE_CONNECTIONS = 1_000
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/mq.Mq/publish"),
    (":authority", "bench"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


@contextlib.contextmanager
def daemon(source: Path, url: str, dsn: str, prefix: str) -> Iterator[tuple[int, int]]:
    """The daemon of source on those backends; yields (gRPC port, pid)."""
    port, http_port = free_port(), free_port()
    server = {"grpc_host": "127.0.0.1", "grpc_port": port, "http_host": "127.0.0.1"}
    server["http_port"] = http_port
    if (source / "eventbus" / "h2limits.py").exists():
        server["max_connections"] = 2 * IDLE_CONNECTIONS
    sections = {
        "server": server,
        "amqp": {"url": url, "namespace": "bench_transport"},
        "postgres": {"dsn": dsn},
        "redis": {"key_prefix": prefix},
        "log": {"level": "warning"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(to_toml(sections))
        process = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "serve", "--config", str(config)],
            cwd=source,
            env={**os.environ, "PYTHONPATH": str(source)},
        )
        try:
            wait_serving(port)
            yield port, process.pid
        finally:
            process.terminate()
            process.wait(30)


def check(port: int, timeout: float = 30) -> float:
    """Seconds one Health/Check took."""
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        call(HealthCheckRequest(), timeout=timeout)
    return time.monotonic() - started


def wait_serving(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(grpc.RpcError):
            check(port, timeout=1)
            return
        time.sleep(0.2)
    raise SystemExit("daemon did not serve within 60 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def client(port: int) -> tuple[socket.socket, H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    h2 = H2Connection(H2Configuration(client_side=True))
    h2.initiate_connection()
    sock.sendall(h2.data_to_send())
    return sock, h2


def rapid_reset(port: int, resets: int) -> str:
    """Send resets HEADERS+RST_STREAM pairs on one connection; say how that connection ended."""
    sock, h2 = client(port)
    sent = 0
    try:
        for _ in range(resets // 100):
            for _ in range(100):
                stream_id = h2.get_next_available_stream_id()
                h2.send_headers(stream_id, HEADERS)
                h2.reset_stream(stream_id, ErrorCodes.CANCEL)
            sock.sendall(h2.data_to_send())
            sent += 100
    except TimeoutError:
        return f"the daemon stopped reading after {sent} pairs"
    except OSError as error:
        return f"closed by the daemon after {sent} pairs ({type(error).__name__})"
    finally:
        sock.close()
    return f"all {sent} pairs sent"


def probe(port: int, stop: threading.Event, latencies: list[float]) -> None:
    while not stop.is_set() and len(latencies) < 10_000:
        try:
            latencies.append(check(port, timeout=PROBE_TIMEOUT))
        except grpc.RpcError:
            latencies.append(PROBE_TIMEOUT)
        time.sleep(0.01)


def measure_reset(port: int, pid: int, resets: int) -> None:
    rss_before = rss_mib(pid)
    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(port, stop, latencies))
    prober.start()
    time.sleep(1)
    quiet = len(latencies)
    started = time.monotonic()
    outcome = rapid_reset(port, resets)
    attack = time.monotonic() - started
    time.sleep(5)  # what the attack left queued
    stop.set()
    prober.join()
    during = latencies[quiet:]
    print(
        f"  rapid reset: {outcome} in {attack:.2f} s; RSS {rss_before:.1f} MiB before,"
        f" {rss_mib(pid):.1f} after",
        flush=True,
    )
    print(
        f"  Health/Check beside it: {len(during)} calls, median {statistics.median(during):.3f} s,"
        f" slowest {max(during):.3f} s (before: slowest {max(latencies[:quiet]):.3f} s)"
    )


def measure_idle(port: int, pid: int) -> None:
    before = rss_mib(pid)
    crowd = [client(port) for _ in range(IDLE_CONNECTIONS)]
    time.sleep(2)
    during = rss_mib(pid)
    served = check(port)
    for sock, _ in crowd:
        sock.close()
    time.sleep(3)
    after = rss_mib(pid)
    print(
        f"  {IDLE_CONNECTIONS} idle connections: RSS {before:.1f} MiB before, {during:.1f} during"
        f" ({(during - before) * 1024 / IDLE_CONNECTIONS:.1f} KiB each), {after:.1f} after;"
        f" a Check meanwhile took {served:.3f} s"
    )


def main(source: Path, resets: int) -> None:
    with bench_backends() as (url, dsn, prefix), daemon(source, url, dsn, prefix) as (port, pid):
        print(f"eventbus from {source}", flush=True)
        measure_idle(port, pid)
        measure_reset(port, pid, resets)


if __name__ == "__main__":
    source = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    main(source, int(sys.argv[2]) if len(sys.argv) > 2 else RESETS)
