"""PostgreSQL failover under a running daemon: a primary and a streaming standby of this test's
own (scripts/cluster.py's PgNode, on free ports), the daemon given both in a multi-host DSN. The
primary is killed and the standby promoted: the daemon's bookkeeping waits in RabbitMQ meanwhile
and is written to the new primary after; nothing confirmed is lost and the daemon goes on."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from eventbus.backends import aio
from eventbus.backends.store import (
    PER_HOST_TIMEOUT,
    Hosts,
    NoPrimary,
    attempt_timeout,
    hide,
    hosts_of,
    open_store,
    pool_options,
)
from eventbus.config import PostgresConfig, load
from scripts.cluster import ClusterError, PgNode, free_ports, kill_under
from tests import servers
from tests.bus_client import BusClient
from tests.conftest import Backends
from tests.daemon_process import DaemonProcess
from tests.test_faults import Publisher, drain


@dataclass
class PgPair:
    primary: PgNode
    standby: PgNode

    @property
    def dsn(self) -> str:
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/eventbus?target_session_attrs=read-write"

    def count(self, node: PgNode, sql: str) -> int:
        return int(node.sql(sql, database="eventbus"))


@pytest.fixture
def pg_pair() -> Iterator[PgPair]:
    """A primary with the eventbus database and a standby streaming from it, synchronously (a
    commit the daemon saw is on the standby too), in a directory the postgres user can reach."""
    base = Path(tempfile.mkdtemp(prefix="eb-pg-pair-"))
    base.chmod(0o755)
    ports = free_ports(2)
    pair = PgPair(PgNode(base / "pg1", ports[0]), PgNode(base / "pg2", ports[1]))
    try:
        pair.primary.init_primary()
        pair.primary.start()
        pair.primary.sql("CREATE DATABASE eventbus")
        pair.standby.init_standby(pair.primary, synchronous=True)
        pair.standby.start()
        deadline = time.monotonic() + 30
        while pair.primary.streaming_standbys() == 0:
            assert time.monotonic() < deadline, "the standby never streamed"
            time.sleep(0.1)
        yield pair
    finally:
        for node in (pair.primary, pair.standby):
            node.stop(grace=5)
        kill_under(base, grace=2)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def failover_daemon(pg_pair: PgPair, amqp_url: str, tmp_path: Path) -> Iterator[DaemonProcess]:
    prefix = servers.unique_name("eventbus_test") + ":"
    backends = Backends(amqp_url, pg_pair.dsn, prefix, servers.unique_name("ns"))
    daemon = DaemonProcess(
        tmp_path / "node",
        backends,
        delivery={"ack_deadline_seconds": 4},
        cron={"interval_seconds": 0.2},
    )
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.kill()
        servers.delete_redis_keys(prefix)


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Poll check() until true; the seconds it took."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_primary_killed_and_standby_promoted_under_traffic(
    pg_pair: PgPair, failover_daemon: DaemonProcess
) -> None:
    daemon, primary, standby = failover_daemon, pg_pair.primary, pg_pair.standby
    client = BusClient(daemon.grpc_address)
    for i in range(4):
        client.delay_publish("failover-delayed", f"early{i}", delay=6)
    for i in range(10):
        client.publish("failover-acks", f"before{i}")
    before = [client.subscribe("failover-acks") for _ in range(10)]
    for reply in before[:5]:
        client.ack(reply.id)
    wait_for("bookkeeping on the primary", lambda: settled(pg_pair, primary) == 5, 10)
    assert pg_pair.count(standby, "SELECT count(*) FROM delayed_messages") == 4  # replicated

    publisher = Publisher(client, "failover-traffic")
    publisher.start()
    time.sleep(1)
    primary.kill()
    killed = time.monotonic()
    for i in range(10):
        client.publish("failover-acks", f"during{i}")
    during = [client.subscribe("failover-acks") for _ in range(10)]
    for reply in during[:5]:
        client.ack(reply.id)  # the settlements wait in RabbitMQ
    client.delay_publish("failover-delayed", "late", delay=1)
    assert daemon.http_get("/readyz")[0] == 503
    time.sleep(1)
    standby.promote()
    promoted = time.monotonic()
    wait_for("settlements on the new primary", lambda: settled(pg_pair, standby) == 10, 30)
    first_write = time.monotonic()
    print(
        f"\nprimary killed -> standby promoted {promoted - killed:.2f} s, "
        f"-> bookkeeping written on the new primary {first_write - killed:.2f} s "
        f"({first_write - promoted:.2f} s after the promotion)"
    )
    daemon.wait_ready(30)
    time.sleep(1)
    publisher.stop.set()
    publisher.join(30)

    # The unacked deliveries of both sides of the failover come back once (their deadline is
    # met by the republish cron on the new primary); the acked ones never do.
    unacked = Counter({reply.data: 1 for reply in [*before[5:], *during[5:]]})
    assert drain(client, "failover-acks", wait=8) == unacked
    assert drain(client, "failover-acks", wait=5) == Counter()
    delayed = drain(client, "failover-delayed", wait=8)
    assert delayed == Counter({"late": 1, **{f"early{i}": 1 for i in range(4)}})
    traffic = drain(client, "failover-traffic", wait=3)
    lost = set(publisher.confirmed) - set(traffic)
    assert len(publisher.confirmed) > 50 and lost == set(), f"lost {sorted(lost)[:10]}"
    assert publisher.other_errors == []

    assert daemon.process.poll() is None, daemon.log
    assert f"PostgreSQL: the pool now connects to 127.0.0.1:{standby.port}" in daemon.log
    assert pg_pair.count(standby, "SELECT count(*) FROM quarantine") == 0


def settled(pair: PgPair, node: PgNode) -> int:
    try:
        return pair.count(node, "SELECT count(*) FROM settlements WHERE outcome = 'ack'")
    except ClusterError:  # not answering yet
        return -1


async def test_a_primary_turned_read_only_is_left_for_the_promoted_standby(
    pg_pair: PgPair,
) -> None:
    """A write refused as read-only drops the pool's connections; with no host taking writes the
    call fails as NoPrimary (an outage, retried by its caller), and once the standby is promoted
    the same Store writes there."""
    primary, standby = pg_pair.primary, pg_pair.standby
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=pg_pair.dsn), window=10)
        try:
            await store.execute("CREATE TABLE failover_probe (n integer)")
            await store.execute("INSERT INTO failover_probe VALUES (1)")
            assert store.host == f"127.0.0.1:{primary.port}"
            primary.sql("ALTER SYSTEM SET default_transaction_read_only = on")
            primary.sql("SELECT pg_reload_conf()")
            await trio.sleep(0.5)
            with pytest.raises(NoPrimary, match="read-only"):
                await store.ping()  # it answers a SELECT, but takes no write: not ready
            with pytest.raises(NoPrimary):
                await store.execute("INSERT INTO failover_probe VALUES (2)")
            await trio.to_thread.run_sync(standby.promote)
            await store.execute("INSERT INTO failover_probe VALUES (3)")
            assert store.host == f"127.0.0.1:{standby.port}"
            await store.ping()
            rows = await store.fetch("SELECT n FROM failover_probe ORDER BY n")
            assert [row["n"] for row in rows] == [1, 3]
        finally:
            await store.close()
    with pytest.raises(Exception, match="read-only"):
        primary.sql("INSERT INTO failover_probe VALUES (4)", database="eventbus")


async def test_a_first_host_that_never_answers_leaves_time_for_the_next(postgres_dsn: str) -> None:
    """The first host takes the TCP connection and says nothing: after PER_HOST_TIMEOUT the
    second host (this machine's PostgreSQL) is tried within the same attempt, and taken."""
    silent = socket.create_server(("127.0.0.1", 0), backlog=50)
    port = silent.getsockname()[1]
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{port},127.0.0.1:5432")
    try:
        async with aio.open_loop(lambda: None):
            store = await open_store(PostgresConfig(dsn=dsn), window=16)
            try:
                assert store.host == "127.0.0.1:5432"
                assert await store.fetchval("SELECT 41 + 1") == 42
            finally:
                await store.close()
    finally:
        silent.close()
    assert attempt_timeout(2) == 2 * PER_HOST_TIMEOUT + 1


class RefusingPostgres:
    """A PostgreSQL host, in a thread on a port of its own, that answers every login with one
    FATAL error (SQLSTATE code): too many connections, no such database, and the like."""

    def __init__(self, code: str, text: str) -> None:
        fields = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + text.encode() + b"\0\0"
        self._error = b"E" + struct.pack("!I", 4 + len(fields)) + fields
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with client, contextlib.suppress(OSError):
                self._refuse(client)

    def _refuse(self, client: socket.socket) -> None:
        length, code = struct.unpack("!II", client.recv(8, socket.MSG_WAITALL))
        if code == 80877103:  # SSLRequest: no SSL here; the startup message follows
            client.sendall(b"N")
            (length,) = struct.unpack("!I", client.recv(4, socket.MSG_WAITALL))
            client.recv(length - 4, socket.MSG_WAITALL)
        else:
            client.recv(length - 8, socket.MSG_WAITALL)
        client.sendall(self._error)

    def close(self) -> None:
        self._listener.close()


REFUSALS = [
    ("53300", "sorry, too many clients already"),
    ("28000", "no pg_hba.conf entry for host"),
    ("3D000", 'database "eventbus" does not exist'),
]


@pytest.mark.parametrize(("code", "text"), REFUSALS)
async def test_a_host_that_refuses_the_login_is_passed_over(
    postgres_dsn: str, code: str, text: str
) -> None:
    refusing = RefusingPostgres(code, text)
    dsn = postgres_dsn.replace("127.0.0.1:5432", f"127.0.0.1:{refusing.port},127.0.0.1:5432")
    try:
        async with aio.open_loop(lambda: None):
            store = await open_store(PostgresConfig(dsn=dsn), window=10)
            try:
                assert store.host == "127.0.0.1:5432"
                await store.ping()
            finally:
                await store.close()
    finally:
        refusing.close()


async def test_when_every_host_refuses_no_primary_says_why_each_was_passed_over() -> None:
    hosts = [RefusingPostgres(code, text) for code, text in REFUSALS]
    spec = ",".join(f"127.0.0.1:{host.port}" for host in hosts)
    dsn = f"postgresql://eb:s3cr%40t@{spec}/eventbus?target_session_attrs=read-write"
    try:
        async with aio.open_loop(lambda: None):
            with pytest.raises(NoPrimary) as raised:
                await aio.call(Hosts(dsn).connect, dsn, target_session_attrs="read-write")
    finally:
        for host in hosts:
            host.close()
    message = str(raised.value)
    for host, (_, text) in zip(hosts, REFUSALS, strict=True):
        assert f"127.0.0.1:{host.port} " in message and text in message, message
    assert "TooManyConnectionsError" in message and "InvalidCatalogNameError" in message
    assert "s3cr" not in message
    assert hide("login as eb with s3cr@t failed", "s3cr%40t") == "login as eb with *** failed"


def test_a_multi_host_dsn_is_valid_config_and_defaults_to_read_write(tmp_path: Path) -> None:
    dsn = "postgresql://eb:secret@db1:5432,db2:5433,[::1]/eventbus?sslmode=require"
    path = tmp_path / "config.toml"
    path.write_text(f'[postgres]\ndsn = "{dsn}"\n')
    assert load(str(path), {}).postgres.dsn == dsn
    assert hosts_of(dsn) == [("db1", 5432), ("db2", 5433), ("::1", None)]
    assert pool_options(dsn) == {"target_session_attrs": "read-write"}
    assert pool_options(dsn + "&target_session_attrs=any") == {}  # as the DSN asks
    assert pool_options("postgresql://eb@db1:5432/eventbus") == {}  # one host: as before
    assert isinstance(NoPrimary("none"), OSError)  # waited out like any outage
