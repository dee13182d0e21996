"""`eventbus top`: the rates and the screen as plain functions, then the real thing on a tmux
terminal against a daemon carrying traffic from the Python client: the numbers it shows agree
with /stats and the Admin API, q and Ctrl-C quit with status 0, it keeps going while the daemon
is away, and an unreachable daemon is one line and status 3."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from rich.console import Console

from eventbus import __version__
from eventbus.client import Client, OutboundMessage
from eventbus.tools import view
from eventbus.tools.sampling import NodeStats, QueueCounts, Readiness, Reading, rates
from tests import servers
from tests.certs import issue, make_ca
from tests.daemon_process import DaemonProcess, auth_table
from tests.terminal import EVENTBUS, ROOT, eventbus, module_daemon, tmux, wait_until, with_client

QUICK: dict[str, dict[str, Any]] = {
    "delivery": {"nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
}


# ---- rates and the screen, as plain functions ------------------------------------------------


def stats(uptime: float, node: str = "n1", **queues: dict[str, int]) -> NodeStats:
    return NodeStats(node, "1.0", uptime, queues)


def test_rates_are_counter_differences_over_the_nodes_uptime() -> None:
    before = stats(10.0, a={"published": 100, "delivered": 50, "acked": 40})
    after = stats(12.0, a={"published": 300, "delivered": 90, "acked": 40}, b={"published": 4})
    assert rates(before, after) == {
        "a": {"publish": 100.0, "deliver": 20.0, "ack": 0.0},
        "b": {"publish": 2.0, "deliver": 0.0, "ack": 0.0},  # counted since the last reading
    }


def test_no_rates_across_a_restart_another_node_or_a_counter_going_back() -> None:
    before = stats(100.0, a={"published": 10})
    assert rates(None, before) is None
    assert rates(before, stats(3.0, a={"published": 12})) is None  # restarted
    assert rates(before, stats(101.0, node="n2", a={"published": 12})) is None
    assert rates(before, stats(100.0, a={"published": 12})) is None  # no time passed
    went_back = rates(before, stats(102.0, a={"published": 4, "acked": 2}))
    assert went_back == {"a": {"deliver": 0.0, "ack": 1.0}}


def text_of(frame: view.Frame) -> str:
    console = Console(width=160, record=True, color_system=None)
    console.print(view.render(frame))
    return console.export_text()


def row_of(screen: str, queue: str) -> list[str] | None:
    """The cells of the queue's row on a screen of top (None while it is not there)."""
    for line in screen.splitlines():
        cells = line.split()
        if cells and cells[0] == queue:
            return cells[1:]
    return None


def frame(
    reading: Reading, frame_rates: Any, http: str | None = "http://h:1", height: int = 40
) -> view.Frame:
    moment = datetime(2030, 1, 2, 3, 4, 5)
    return view.Frame("h:2", http, reading, frame_rates, moment, 1.0, height)


def test_the_screen_shows_counts_rates_health_and_totals() -> None:
    queues = [QueueCounts("a", 5, 2, 1, 3, 4), QueueCounts("b", 1, 0, 0, 0, 0)]
    readiness = Readiness(False, {"rabbitmq": "refused"}, {"redis": "slow"})
    reading = Reading(queues, None, stats(3725.0, a={}), readiness)
    screen = text_of(frame(reading, {"a": {"publish": 12.5, "deliver": 2.0, "ack": 1.25}}))
    assert row_of(screen, "a") == ["5", "2", "1", "3", "4", "12.5", "2.0", "1.2"]
    assert row_of(screen, "b") == ["1", "0", "0", "0", "0", "0.0", "0.0", "0.0"]
    assert row_of(screen, "total") == ["6", "2", "1", "3", "4", "12.5", "2.0", "1.2"]
    assert "NOT READY" in screen and "rabbitmq down (refused)" in screen
    assert "redis degraded (slow)" in screen and "postgresql up" in screen
    assert "node n1  v1.0  up 01:02:05" in screen and "03:04:05" in screen

    unknown = text_of(frame(reading, None))  # one reading so far
    assert row_of(unknown, "a") == ["5", "2", "1", "3", "4", "-", "-", "-"]
    without_http = text_of(frame(Reading(queues), None, http=None))
    assert row_of(without_http, "a") == ["5", "2", "1", "3", "4"]
    assert "give --http" in without_http


def test_the_screen_fits_the_terminal_and_names_failures() -> None:
    queues = [QueueCounts(f"q{i:03d}", i, 0, 0, 0, 0) for i in range(100)]
    screen = text_of(frame(Reading(queues, None, stats(1.0), Readiness(True)), None, height=20))
    assert row_of(screen, "q000") and not row_of(screen, "q099")
    assert "more" in screen and len(screen.splitlines()) <= 20
    assert row_of(screen, "total")[0] == str(sum(range(100)))  # type: ignore[index]

    failed = Reading(None, "cannot reach h:2: refused", None, None, "cannot read http://h:1")
    screen = text_of(frame(failed, None))
    assert "queues: cannot reach h:2: refused" in screen and "HTTP: cannot read" in screen
    assert view.uptime(2 * 86400 + 5) == "2d 00:00:05"


# ---- against a real daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bus(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with module_daemon(amqp_url, tmp_path_factory.mktemp("top") / "node0", **QUICK) as daemon:
        yield daemon


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def top_args(daemon: DaemonProcess, *, http: bool = True) -> list[str]:
    args = ["top", "--server", daemon.grpc_address]
    return [*args, "--http", f"127.0.0.1:{daemon.http_port}"] if http else args


def stats_of(daemon: DaemonProcess) -> dict[str, Any]:
    status, body = daemon.http_get("/stats")
    assert status == 200, body
    return dict(json.loads(body))


def admin_counts(daemon: DaemonProcess, queue: str) -> list[str]:
    """The queue's counts as `eventbus queues` (the Admin API) gives them."""
    result = eventbus("queues", queue, "--json", "--server", daemon.grpc_address)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    names = ("ready", "in_flight", "delayed", "dead_letters", "consumers")
    return [str(row[name]) for name in names]


def make_traffic(daemon: DaemonProcess, idle: str, busy: str) -> None:
    """idle: 7 ready and nobody consuming. busy: 3 ready, 2 in flight, 1 delayed, 1 dead."""

    async def scenario(client: Client) -> None:
        await client.publish_batch(OutboundMessage(b"i", queue=idle) for _ in range(7))
        await client.publish_batch(OutboundMessage(b"b", queue=busy) for _ in range(6))
        await client.publish_batch([OutboundMessage(b"d", queue=busy, delay_seconds=3600)])
        taken = []
        while len(taken) < 3:
            taken += await client.pull(busy, 3 - len(taken), wait_seconds=5)
        assert await client.nack([taken[0].ack_id], dead_letter=True) == []

    with_client(daemon.grpc_address, scenario)


class Steady:
    """Publishes to a queue from a thread, ten messages every 0.1 s, until stopped."""

    def __init__(self, daemon: DaemonProcess, queue: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(daemon, queue), daemon=True)

    def _run(self, daemon: DaemonProcess, queue: str) -> None:
        async def pump(client: Client) -> None:
            while not self._stop.is_set():
                await client.publish_batch(OutboundMessage(b"f", queue=queue) for _ in range(10))
                await asyncio.sleep(0.1)

        with_client(daemon.grpc_address, pump)

    def __enter__(self) -> Steady:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_top_agrees_with_stats_and_the_admin_api_and_q_quits(bus: DaemonProcess) -> None:
    idle, busy, flow = unique("top.idle"), unique("top.busy"), unique("top.flow")
    make_traffic(bus, idle, busy)
    with tmux(160, 40) as terminal:
        terminal.run(top_args(bus))
        wait_until(
            lambda: (row_of(terminal.screen(), busy) or [])[:4] == ["3", "2", "1", "1"],
            what="busy's row: 3 ready, 2 in flight, 1 delayed, 1 dead",
        )
        screen = terminal.screen()
        assert row_of(screen, idle)[:5] == admin_counts(bus, idle)  # type: ignore[index]
        assert row_of(screen, idle)[:2] == ["7", "0"]  # type: ignore[index]
        assert row_of(screen, busy)[:5] == admin_counts(bus, busy)  # type: ignore[index]
        document = stats_of(bus)
        assert document["queues"][idle]["published"] == 7
        assert f"node {document['node']}  v{__version__}  up " in screen
        assert "READY  rabbitmq up  postgresql up  redis up  grpc up" in screen

        with Steady(bus, flow):
            wait_until(
                lambda: float((row_of(terminal.screen(), flow) or ["0"] * 6)[5]) > 0,
                what="a publish rate for the flowing queue",
            )
        published = stats_of(bus)["queues"][flow]["published"]
        wait_until(
            lambda: (row_of(terminal.screen(), flow) or [""] * 8)[5:] == ["0.0", "0.0", "0.0"],
            what="the rates back to 0.0 once the traffic stopped",
        )
        assert published >= 10
        assert terminal.screen().count("EXIT=") == 0
        terminal.send("q")
        assert terminal.exit_status() == 0
        assert row_of(terminal.screen(), busy) is None  # the terminal's own screen is back


def test_ctrl_c_quits_with_status_0_and_grpc_alone_shows_counts(bus: DaemonProcess) -> None:
    with tmux(120, 30) as terminal:
        terminal.run(top_args(bus, http=False))
        screen = terminal.wait_for("give --http")
        assert "READY" not in screen
        assert len(row_of(screen, "total") or []) == 5  # counts, and no rate columns filled
        terminal.send("C-c")
        assert terminal.exit_status() == 0


def test_top_goes_on_while_the_daemon_is_away(make_daemon: Any) -> None:
    daemon = make_daemon(**QUICK)
    daemon.wait_ready()
    with tmux(160, 40) as terminal:
        terminal.run(top_args(daemon))
        terminal.wait_for("rabbitmq up")
        daemon.kill()
        screen = terminal.wait_for("queues: cannot reach")
        assert "HTTP: cannot read" in screen and "EXIT=" not in screen
        terminal.send("q")
        assert terminal.exit_status() == 0


def test_an_unreachable_daemon_is_one_line_and_status_3(bus: DaemonProcess) -> None:
    closed = f"127.0.0.1:{servers.closed_port()}"
    result = eventbus("top", "--server", closed)
    assert result.returncode == 3 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"eventbus: cannot reach {closed}: ")
    no_http = eventbus("top", "--server", bus.grpc_address, "--http", closed)
    assert no_http.returncode == 3
    assert no_http.stderr.startswith(f"eventbus: cannot read http://{closed}/stats")
    assert len(no_http.stderr.splitlines()) == 1
    with tmux(120, 30) as terminal:  # the same on a terminal
        terminal.run(["top", "--server", closed])
        assert terminal.exit_status() == 3
        assert f"eventbus: cannot reach {closed}" in terminal.screen()


def test_piped_it_prints_one_screen(bus: DaemonProcess) -> None:
    queue = unique("top.piped")
    with_client(
        bus.grpc_address,
        lambda c: c.publish_batch(OutboundMessage(b"p", queue=queue) for _ in range(4)),
    )
    started = time.monotonic()
    result = eventbus(*top_args(bus), "--interval", "0.5")
    assert result.returncode == 0, result.stderr
    assert row_of(result.stdout, queue)[:2] == ["4", "0"]  # type: ignore[index]
    assert "rabbitmq up" in result.stdout and time.monotonic() - started < 30


def test_over_tls_with_a_token(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Any
) -> None:
    ca = make_ca(tmp_path / "ca", "bus CA")
    server = issue(ca, "bus")
    tls = {"cert_file": str(server.cert_file), "key_file": str(server.key_file), "http": True}
    ops, worker = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    auth = auth_table(
        "token",
        ops={"token_sha256": hashlib.sha256(ops.encode()).hexdigest(), "admin": True},
        worker={"token_sha256": hashlib.sha256(worker.encode()).hexdigest(), "publish": ["*"]},
    )
    directory = tmp_path_factory.mktemp("top-tls") / "node0"
    with module_daemon(amqp_url, directory, ready=False, tls=tls, auth=auth, **QUICK) as daemon:
        https = f"https://127.0.0.1:{daemon.http_port}"
        context = ssl.create_default_context(cafile=str(ca.cert_file))

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{https}/readyz", context=context, timeout=2) as got:
                    return bool(got.status == 200)
            except OSError:
                return False

        wait_until(ready, timeout=30, what="/readyz over TLS")
        base = ["top", "--server", daemon.grpc_address, "--tls-ca", str(ca.cert_file)]
        shown = eventbus(*base, "--http", https, "--token", ops, "--interval", "0.3")
        assert shown.returncode == 0, shown.stderr
        assert "READY  rabbitmq up" in shown.stdout and row_of(shown.stdout, "total")

        for token, status in (([], "401"), (["--token", worker], "403")):
            refused = eventbus(*base, "--http", https, *token)
            assert refused.returncode == 1, refused.stderr
            [line] = refused.stderr.splitlines()
            assert line.startswith(f"eventbus: {https}/stats: HTTP {status}")
        no_admin = eventbus(*base, "--token", worker)  # gRPC alone: the Admin API refuses
        assert no_admin.returncode == 1 and "PERMISSION_DENIED" in no_admin.stderr
        bare = eventbus(*base, "--http", f"127.0.0.1:{daemon.http_port}", "--token", ops)
        assert bare.returncode == 0, bare.stderr  # https:// since a TLS option is given
        assert "READY  rabbitmq up" in bare.stdout and f"http {https}" in bare.stdout
        plain = f"http://127.0.0.1:{daemon.http_port}"  # said so: plain, this machine
        refused = eventbus(*base, "--http", plain, "--token", ops)
        assert refused.returncode == 3 and "cannot read http://" in refused.stderr


def test_no_token_over_plain_http_to_another_machine() -> None:
    closed = f"127.0.0.1:{servers.closed_port()}"
    for http, options in (
        ("http://192.0.2.10:8080", []),
        ("192.0.2.10:8080", []),
        ("bus.example.com:8080", []),
        ("http://bus.example.com:8080", ["--tls"]),  # the URL says http://
    ):
        result = eventbus("top", "--server", closed, "--http", http, "--token", "t", *options)
        assert result.returncode == 2 and result.stdout == "", (http, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith("eventbus: --http http://") and "plain text" in line
    for http in ("localhost:1", "[::1]:1", f"http://{closed}"):  # this machine: tried
        result = eventbus("top", "--server", closed, "--http", http, "--token", "t")
        assert result.returncode == 3, (http, result.stderr)


class FakeHttp:
    """A TCP server on 127.0.0.1 standing in for a daemon's HTTP port in the ways a daemon does
    not behave: answer(path, n) gives the raw bytes of the n-th request's reply (None: read
    the request and never answer), sent before the connection is closed."""

    def __init__(self, answer: Callable[[str, int], bytes | None]) -> None:
        self._answer = answer
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        count = 0
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            request = b""
            while b"\r\n\r\n" not in request and (chunk := connection.recv(4096)):
                request += chunk
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else ""
            reply = self._answer(path, count)
            count += 1
            if reply is None:
                self._held.append(connection)
                continue
            connection.sendall(reply)
            connection.close()

    def __enter__(self) -> FakeHttp:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for connection in self._held:
            connection.close()
        self._server.close()


def reply(status: str, body: bytes, *, length: int | None = None, kind: str = "json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/{kind}\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    return head.encode() + body


STATS = json.dumps({"node": "fake-node", "version": "1", "uptime_seconds": 5, "queues": {}})
READY = json.dumps({"ready": True})


def test_an_http_port_that_answers_wrongly_is_one_line_and_status_3(bus: DaemonProcess) -> None:
    def one_line(result: Any, text: str) -> None:
        assert result.returncode == 3 and result.stdout == "", result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("eventbus: cannot read http://") and text in line, line

    grpc_port = eventbus(*top_args(bus, http=False), "--http", bus.grpc_address)
    one_line(grpc_port, "/stats: ")
    cut_short = FakeHttp(lambda path, n: reply("200 OK", b'{"node": "', length=1000))
    with cut_short:  # the daemon killed in the middle of its reply
        one_line(eventbus(*top_args(bus, http=False), "--http", cut_short.address), "/stats: ")
    proxy = FakeHttp(
        lambda path, n: (
            reply("200 OK", STATS.encode())
            if path == "/stats"
            else reply("503 Service Unavailable", b"<html>down</html>", kind="html")
        )
    )
    with proxy:  # a proxy's own 503 page in front of the daemon
        result = eventbus(*top_args(bus, http=False), "--http", proxy.address)
        one_line(result, "/readyz: HTTP 503 without the daemon's JSON")


def test_q_and_ctrl_c_do_not_wait_for_an_http_port_that_never_answers(bus: DaemonProcess) -> None:
    first_two = FakeHttp(
        lambda path, n: reply("200 OK", (STATS if n == 0 else READY).encode()) if n < 2 else None
    )
    with first_two, tmux(120, 30) as terminal:
        terminal.run([*top_args(bus, http=False), "--http", first_two.address, "--timeout", "300"])
        terminal.wait_for("node fake-node")
        time.sleep(2)  # the next reading waits on the port
        terminal.send("q")
        assert terminal.exit_status(timeout=20) == 0

    never = FakeHttp(lambda path, n: None)
    with never:
        command = [*EVENTBUS, *top_args(bus, http=False), "--http", never.address]
        started = subprocess.Popen(
            [*command, "--timeout", "300"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(3)  # the first reading waits on the port
        started.send_signal(signal.SIGINT)
        _, stderr = started.communicate(timeout=20)
        assert started.returncode == 130 and b"Traceback" not in stderr, stderr
