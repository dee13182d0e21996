"""Reload without restart: which keys changed and which apply live, as plain decisions over
Config values; then real daemons sent SIGHUP after their config.toml was rewritten: a token
revoked and an identity added under traffic, a broken file refused, a queue policy, the log level,
keys that need a restart, a rotated server certificate, and what systemd hears."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import signal
import socket
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trio
import trio.testing

from eventbus._generated import v2_pb2
from eventbus.backends.lock import RedisLock
from eventbus.config import (
    AuthConfig,
    Config,
    CronConfig,
    DeliveryConfig,
    IdentityConfig,
    LogConfig,
    QueuePolicyConfig,
    ServerConfig,
    TlsConfig,
)
from eventbus.delivery.policy import Policies
from eventbus.jobs.cron import Cron
from eventbus.jobs.republish import RetryRules
from eventbus.ops import reload
from eventbus.ops.notify import Notifier
from tests.certs import Issued, issue, make_ca
from tests.daemon_process import auth_table
from tests.servers import free_port, unique_name
from tests.test_recorded_retries import AlwaysGranted
from tests.v2_client import StreamHandle, V2Client, message
from tests.v2_support import dead_letters, dead_letters_of, quick

# The configuration diff, on plain Config values


def test_changed_keys_are_named_in_declaration_order() -> None:
    old = Config()
    new = dataclasses.replace(
        old,
        amqp=dataclasses.replace(old.amqp, url="amqp://elsewhere/"),
        server=dataclasses.replace(old.server, grpc_port=9999),
    )
    assert reload.changed_keys(old, new) == ["server.grpc_port", "amqp.url"]
    assert reload.changed_keys(old, Config()) == []


def test_tables_of_tables_count_as_one_key() -> None:
    alice, bob = IdentityConfig("alice", publish=("a.*",)), IdentityConfig("bob")
    old = Config(auth=AuthConfig("token", (alice,)))
    new = Config(
        auth=AuthConfig("token", (dataclasses.replace(alice, publish=("b.*",)), bob)),
        queues=(QueuePolicyConfig("orders.*", max_retries=1),),
    )
    assert reload.changed_keys(old, new) == ["auth.identities", "queues"]


def test_a_plan_takes_the_live_keys_and_names_the_rest() -> None:
    old = Config()
    new = Config(
        server=ServerConfig(grpc_port=1234),
        delivery=DeliveryConfig(max_retries=7, dedup_window_seconds=60),
        log=LogConfig(level="warning", format="json"),
        cron=CronConfig(interval_seconds=5.0),
        queues=(QueuePolicyConfig("q.*"),),
    )
    plan = reload.plan(old, new, reload.live_keys(new, tls_running=False))
    assert plan.applied == ["delivery.max_retries", "cron.interval_seconds", "log.level", "queues"]
    assert plan.restart == ["server.grpc_port", "delivery.dedup_window_seconds", "log.format"]
    running = plan.config
    assert (running.delivery.max_retries, running.delivery.dedup_window_seconds) == (7, 600)
    assert (running.log.level, running.log.format) == ("warning", "text")
    assert (running.server.grpc_port, running.cron.interval_seconds) == (9091, 5.0)
    assert running.queues == new.queues
    # The keys left for a restart are named again at the next reload, until one happens.
    again = reload.plan(running, new, reload.live_keys(new, tls_running=False))
    assert (again.applied, again.restart) == ([], plan.restart)


def test_tls_files_change_live_only_while_tls_is_on() -> None:
    tls = TlsConfig(cert_file="/a.crt", key_file="/a.key", client_ca_file="/ca.crt")
    old = Config(tls=tls)
    new = Config(tls=dataclasses.replace(tls, cert_file="/b.crt", key_file="/b.key"))
    on = reload.plan(old, new, reload.live_keys(new, tls_running=True))
    assert (on.applied, on.restart) == (["tls.cert_file", "tls.key_file"], [])
    off = Config()  # TLS turned off: the running daemon keeps serving TLS until a restart
    assert reload.plan(old, off, reload.live_keys(off, tls_running=True)).restart == [
        "tls.cert_file",
        "tls.key_file",
        "tls.client_ca_file",
    ]
    started_plain = reload.plan(Config(), new, reload.live_keys(new, tls_running=False))
    assert started_plain.applied == [] and "tls.cert_file" in started_plain.restart


def test_mtls_mode_waits_for_a_restart_on_a_daemon_without_tls() -> None:
    identities = (IdentityConfig("a", certificate_subject="CN=a"),)
    new = Config(auth=AuthConfig("mtls", identities))
    plain = reload.plan(Config(), new, reload.live_keys(new, tls_running=False))
    assert plain.restart == ["auth.mode"] and plain.applied == ["auth.identities"]
    assert plain.config.auth.mode == "off"
    tls = reload.plan(Config(), new, reload.live_keys(new, tls_running=True))
    assert tls.applied == ["auth.mode", "auth.identities"]


def test_policies_are_replaced_in_place_with_their_nack_floor() -> None:
    policies = Policies(Config(queues=(QueuePolicyConfig("orders.*", max_retries=2),)))
    rules = RetryRules.of(Config(), policies)
    assert policies.for_queue("orders.new").max_retries == 2
    assert rules.nack_floor == pytest.approx(0.9)  # 1 s backoff less 10 % jitter
    lenient = QueuePolicyConfig("orders.*", max_retries=9, backoff_min_seconds=10)
    policies.replace(Config(delivery=DeliveryConfig(max_retries=4), queues=(lenient,)))
    assert policies.for_queue("orders.new").max_retries == 9  # the cached lookup is gone too
    assert policies.for_queue("other").max_retries == 4
    assert rules.nack_floor == pytest.approx(9.0)  # the republish job claims by the new floor


async def test_a_cron_interval_changes_while_it_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[float] = []

    async def job() -> None:
        runs.append(trio.current_time())

    cron = Cron("job", job, cast(RedisLock, AlwaysGranted()), 100.0, 30.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cron.run)
        await trio.sleep(5)
        cron.set_interval(2.0)  # 2 s since the tick at 0 have passed: the next one at once
        await trio.sleep(4.5)
        cron.set_interval(50.0)  # longer: the wait under way keeps its end, later ones grow
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert runs == pytest.approx([0, 5, 7, 9, 11, 61])


def test_reloading_tells_the_monotonic_time() -> None:
    with notify_socket() as (sock, path):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        Notifier({"NOTIFY_SOCKET": path}).reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        state, usec = sock.recv(4096).decode().split("\n")
    assert state == "RELOADING=1"
    name, _, value = usec.partition("=")
    assert name == "MONOTONIC_USEC" and before <= int(value) <= after


def test_log_level_keeps_the_noisy_libraries_at_warning() -> None:
    root = logging.getLogger()
    kept = root.level, logging.getLogger("h2").level
    try:
        reload.set_log_level("debug")
        assert root.level == logging.DEBUG and logging.getLogger("h2").level == logging.WARNING
        reload.set_log_level("error")
        assert root.level == logging.ERROR and logging.getLogger("h2").level == logging.ERROR
    finally:
        root.setLevel(kept[0])
        logging.getLogger("h2").setLevel(kept[1])


# Real daemons, their config.toml rewritten and SIGHUP sent


@pytest.fixture
def notify() -> Iterator[tuple[socket.socket, str]]:
    with notify_socket() as opened:
        yield opened


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A NOTIFY_SOCKET to listen on, in a short directory (socket paths are limited to 108)."""
    with (
        tempfile.TemporaryDirectory(prefix="ebn") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = f"{directory}/notify.sock"
        sock.bind(path)
        sock.settimeout(30)
        yield sock, path


def until_ready(sock: socket.socket) -> list[str]:
    """The notifications up to and including the next READY=1."""
    messages = [sock.recv(4096).decode()]
    while messages[-1] != "READY=1":
        messages.append(sock.recv(4096).decode())
    return messages


def sighup(daemon: Any, sock: socket.socket) -> list[str]:
    """Send SIGHUP and wait until the daemon says READY=1 again; what it said meanwhile."""
    daemon.process.send_signal(signal.SIGHUP)
    return until_ready(sock)


def read_config(daemon: Any) -> dict[str, Any]:
    return tomllib.loads(daemon.config_path.read_text())


def write_config(daemon: Any, document: dict[str, Any]) -> None:
    """config.toml from a nested dict: a dict value is a table of its own."""
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        if name:
            lines.append(f"[{name}]")
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in scalars.items())
        for key, value in values.items():
            if isinstance(value, dict):
                table(f"{name}.{json.dumps(key)}" if name else json.dumps(key), value)

    table("", document)
    temporary = daemon.config_path.with_suffix(".new")
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(daemon.config_path)  # as an editor or a deployment tool would


def hashed(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def identity(token: str, **keys: Any) -> dict[str, Any]:
    return {"token_sha256": hashed(token), **keys}


def call(
    channel: grpc.Channel, method: str, request: Any, reply: Any, token: str, timeout: float = 10
) -> Any:
    stub = channel.unary_unary(
        method, request_serializer=type(request).SerializeToString, response_deserializer=reply
    )
    return stub(request, metadata=[("authorization", f"Bearer {token}")], timeout=timeout)


def publish(channel: grpc.Channel, token: str, queue: str, data: bytes = b"x") -> None:
    request = v2_pb2.PublishRequest(messages=[message(queue, data)])
    call(
        channel, "/eventbus.v2.Publisher/Publish", request, v2_pb2.PublishResponse.FromString, token
    )


def pull(channel: grpc.Channel, token: str, queue: str, wait: float) -> list[Any]:
    request = v2_pb2.PullRequest(queue=queue, max_messages=1, wait_seconds=wait)
    reply = v2_pb2.PullResponse.FromString
    method = "/eventbus.v2.Subscriber/Pull"
    return list(call(channel, method, request, reply, token, timeout=wait + 10).messages)


def status_of(action: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        action()
    return cast(grpc.RpcError, raised.value).code()


class Traffic:
    """Publishes in a loop on one channel (one connection) until stopped; counts and errors."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.token = token
        self.queue = unique_name("traffic")
        self.sent = 0
        self.errors: list[grpc.StatusCode] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                publish(self.channel, self.token, self.queue)
                self.sent += 1
            except grpc.RpcError as error:
                self.errors.append(cast(grpc.RpcError, error).code())
            time.sleep(0.002)

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.sent < count:
            assert time.monotonic() < deadline, f"{self.sent} published, errors {self.errors}"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.channel.close()


ALICE, BOB, CAROL, DAVE = "alice-token-1", "bob-token-2", "carol-token-3", "dave-token-4"


def test_a_reload_under_traffic_revokes_a_token_and_admits_a_new_identity(
    make_daemon: Any, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    everything = {"publish": ["*"], "subscribe": ["*"]}
    daemon = make_daemon(
        env={"NOTIFY_SOCKET": path},
        auth=auth_table(
            "token", alice=identity(ALICE, **everything), bob=identity(BOB, **everything)
        ),
    )
    assert until_ready(sock) == ["READY=1"]
    bob = grpc.insecure_channel(daemon.grpc_address)
    carol = grpc.insecure_channel(daemon.grpc_address)  # carol and dave share it
    traffic = Traffic(daemon.grpc_address, ALICE)
    waiting_queue = unique_name("waiting")
    waited: list[list[Any]] = []
    waiter = threading.Thread(
        target=lambda: waited.append(pull(traffic.channel, ALICE, waiting_queue, wait=30))
    )
    try:
        publish(bob, BOB, unique_name("bob"))  # bob's connection is open and admitted
        assert (
            status_of(lambda: publish(carol, CAROL, "carol.q")) == grpc.StatusCode.UNAUTHENTICATED
        )
        waiter.start()  # a call in flight across the reload
        traffic.wait_for(50)
        config = read_config(daemon)
        identities = config["auth"]["identities"]
        del identities["bob"]
        identities["carol"] = identity(CAROL, publish=["carol.*"])
        identities["dave"] = identity(DAVE, publish=["*"], publish_rate=0.01)  # 1 in 100 s
        write_config(daemon, config)
        sent_before = traffic.sent
        monotonic_before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        said = sighup(daemon, sock)
        assert status_of(lambda: publish(bob, BOB, "anything")) == grpc.StatusCode.UNAUTHENTICATED
        publish(carol, CAROL, "carol.q")  # a new identity, with its permissions
        assert status_of(lambda: publish(carol, CAROL, "alice.q")) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        publish(carol, DAVE, "dave.q")  # another, with the quota it came with
        assert status_of(lambda: publish(carol, DAVE, "dave.q")) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        publish(traffic.channel, ALICE, waiting_queue, b"after the reload")
        waiter.join(30)
        traffic.wait_for(sent_before + 50)
    finally:
        traffic.stop()
        bob.close()
        carol.close()
    assert traffic.errors == []
    assert [bytes(m.data) for m in waited[0]] == [b"after the reload"]
    reloading, ready = said
    assert ready == "READY=1"
    state, usec = reloading.split("\n")
    assert state == "RELOADING=1" and usec.startswith("MONOTONIC_USEC=")
    assert monotonic_before <= int(usec.partition("=")[2]) <= monotonic_before + 30_000_000
    assert "reload: applied auth.identities" in daemon.log
    assert "need a restart" not in daemon.log


def test_a_reload_ends_the_streams_of_identities_removed_or_no_longer_allowed(
    make_daemon: Any, notify: tuple[socket.socket, str]
) -> None:
    """Open streams are checked against the new identities: one whose identity is gone ends
    UNAUTHENTICATED, one whose identity may no longer read its queue PERMISSION_DENIED; the
    others go on. Their held messages go back to the queue."""
    sock, path = notify
    everything = {"publish": ["*"], "subscribe": ["*"]}
    tokens = {"alice": ALICE, "bob": BOB, "carol": CAROL}
    daemon = make_daemon(
        env={"NOTIFY_SOCKET": path},
        auth=auth_table("token", **{name: identity(t, **everything) for name, t in tokens.items()}),
    )
    assert until_ready(sock) == ["READY=1"]
    channel = grpc.insecure_channel(daemon.grpc_address)
    queues = {name: unique_name(name) for name in tokens}
    streams = {
        name: StreamHandle(
            channel,
            v2_pb2.StreamingPullRequest(queue=queues[name]),
            metadata=[("authorization", f"Bearer {token}")],
        )
        for name, token in tokens.items()
    }
    try:
        for name, token in tokens.items():
            publish(channel, token, queues[name], b"before")
            assert [bytes(m.data) for m in streams[name].receive(1)] == [b"before"]
        config = read_config(daemon)
        identities = config["auth"]["identities"]
        del identities["bob"]
        identities["carol"]["subscribe"] = ["elsewhere.*"]
        write_config(daemon, config)
        sighup(daemon, sock)
        for name, code in (
            ("bob", grpc.StatusCode.UNAUTHENTICATED),
            ("carol", grpc.StatusCode.PERMISSION_DENIED),
        ):
            with pytest.raises(grpc.RpcError) as ended:
                streams[name].receive(1)
            assert cast(grpc.RpcError, ended.value).code() == code
        publish(channel, ALICE, queues["alice"], b"after")
        assert [bytes(m.data) for m in streams["alice"].receive(1)] == [b"after"]
        # bob's held message went back to its queue: alice may read it
        assert [bytes(m.data) for m in pull(channel, ALICE, queues["bob"], wait=10)] == [b"before"]
    finally:
        for stream in streams.values():
            stream.cancel()
        channel.close()
    assert "reload: ended 2 streams" in daemon.log


def test_a_broken_config_is_refused_in_one_line_and_the_running_one_serves(
    make_daemon: Any, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    daemon = make_daemon(
        env={"NOTIFY_SOCKET": path}, auth=auth_table("token", alice=identity(ALICE, publish=["*"]))
    )
    until_ready(sock)
    channel = grpc.insecure_channel(daemon.grpc_address)
    try:
        good = read_config(daemon)
        broken = copy.deepcopy(good)
        broken["auth"]["identities"] = {"bob": identity(BOB, publish=["*"])}  # would revoke alice
        broken["log"]["level"] = "loud"
        write_config(daemon, broken)
        said = sighup(daemon, sock)
        publish(channel, ALICE, unique_name("still"))
        refusals = [line for line in daemon.log.splitlines() if "reload refused" in line]
        # Fixed, the same identities apply: nothing of the refused file was kept half-applied.
        broken["log"]["level"] = "debug"
        write_config(daemon, broken)
        sighup(daemon, sock)
        assert status_of(lambda: publish(channel, ALICE, "q")) == grpc.StatusCode.UNAUTHENTICATED
        publish(channel, BOB, unique_name("bob"))
    finally:
        channel.close()
    assert [s.split("\n")[0] for s in said] == ["RELOADING=1", "READY=1"]
    assert len(refusals) == 1, refusals
    assert refusals[0].endswith(
        "reload refused: config.toml: log.level: expected one of debug, info, warning, error, "
        'got "loud"; the running configuration stays'
    )
    assert "reload: applied auth.identities" in daemon.log


def test_a_queue_policy_change_applies_to_new_deliveries(
    make_daemon: Any, backends: Any, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    lenient = {"max_retries": 3, "backoff_min_seconds": 0, "backoff_max_seconds": 0}
    daemon = make_daemon(env={"NOTIFY_SOCKET": path}, **quick(**{'queues."policy-*"': lenient}))
    until_ready(sock)
    client = V2Client(daemon.grpc_address)
    queue, pulled_queue = unique_name("policy-streamed"), unique_name("policy-pulled")
    try:
        stream = client.stream(queue, ack_deadline_seconds=60)  # open across the reload
        client.publish(message(queue, b"before"))
        (first,) = stream.receive(1)
        stream.send(nack_ids=[first.ack_id])  # max_retries 3: it comes again
        (again,) = stream.receive(1)
        assert (again.data, again.attempt) == (b"before", 2)
        stream.send(ack_ids=[again.ack_id])
        config = read_config(daemon)
        config["queues"]["policy-*"]["max_retries"] = 0
        write_config(daemon, config)
        sighup(daemon, sock)
        results = client.publish(message(queue, b"after"), message(pulled_queue, b"pulled"))
        (held,) = stream.receive(1)
        stream.send(nack_ids=[held.ack_id])  # max_retries 0 now: a dead letter at once
        (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
        assert (letter["message_id"], letter["attempts"]) == (results[0].message_id, 1)
        assert stream.quiet_for(0.7) == []
        (recorded,) = client.pull(pulled_queue, max_messages=1, wait_seconds=5)
        assert client.nack([recorded.ack_id]) == []  # the republish job decides by the new policy
        (letter,) = dead_letters_of(backends.postgres_dsn, pulled_queue, 1)
        assert (letter["message_id"], letter["attempts"]) == (results[1].message_id, 1)
        assert client.pull(pulled_queue, wait_seconds=0.5) == []
        stream.cancel()
    finally:
        client.close()
    assert dead_letters(backends.postgres_dsn, queue)[0]["body"] == b"after"
    assert "reload: applied queues" in daemon.log


def test_log_level_applies_and_restart_keys_are_named_in_one_line(
    make_daemon: Any, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    daemon = make_daemon(env={"NOTIFY_SOCKET": path})  # log.level debug
    until_ready(sock)
    config = read_config(daemon)
    config["log"]["level"] = "warning"
    config["server"]["grpc_port"] = free_port()
    config["amqp"]["prefetch_count"] = 77
    write_config(daemon, config)
    sighup(daemon, sock)
    quiet = daemon.log
    config["log"]["level"] = "info"
    write_config(daemon, config)
    sighup(daemon, sock)
    client = V2Client(daemon.grpc_address)  # still the port it started on
    try:
        client.publish(message(unique_name("still"), b"x"))
    finally:
        client.close()
    wanted = "need a restart to take effect: server.grpc_port, amqp.prefetch_count"
    (line,) = [line for line in quiet.splitlines() if "need a restart" in line]
    assert line.endswith(wanted)
    assert "reload: applied" not in quiet  # an info line, under warning
    assert daemon.log.count(wanted) == 2  # named at every reload until a restart
    assert daemon.log.count("reload: applied log.level") == 1


def test_a_reload_rotates_the_server_certificate_and_open_connections_keep_working(
    make_daemon: Any, tmp_path: Path, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    old_ca, new_ca = make_ca(tmp_path / "old", "old CA"), make_ca(tmp_path / "new", "new CA")
    old, new = issue(old_ca, "bus"), issue(new_ca, "bus")
    tls = {"cert_file": str(old.cert_file), "key_file": str(old.key_file)}
    daemon = make_daemon(env={"NOTIFY_SOCKET": path}, tls=tls)
    until_ready(sock)
    opened = secure(daemon.grpc_address, old_ca)  # trusts only the old CA
    queue = unique_name("rotated")
    clients = [opened]
    try:
        opened.publish(message(queue, b"before"))
        config = read_config(daemon)
        config["tls"].update(cert_file=str(new.cert_file), key_file=str(new.key_file))
        write_config(daemon, config)
        sighup(daemon, sock)
        opened.publish(message(queue, b"after"))  # the connection opened before goes on
        clients += [secure(daemon.grpc_address, old_ca), secure(daemon.grpc_address, new_ca)]
        refused = status_of(lambda: clients[1].publish(message(queue, b"old trust")))
        clients[2].publish(message(queue, b"new trust"))
        pulled = clients[2].pull(queue, max_messages=10, wait_seconds=5)
    finally:
        for client in clients:
            client.close()
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert {bytes(m.data) for m in pulled} <= {b"before", b"after", b"new trust"} and pulled
    assert "reload: applied tls.cert_file, tls.key_file" in daemon.log


def secure(address: str, ca: Issued) -> V2Client:
    client = V2Client(address)
    client.channel.close()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem)
    client.channel = grpc.secure_channel(address, credentials)
    return client
