"""The daemon's connections to RabbitMQ, PostgreSQL and Redis: URLs read from files (systemd's
LoadCredential= and $CREDENTIALS_DIRECTORY), and TLS to each.

The shared servers are left as they are. PostgreSQL and Redis over TLS are servers of this
module's own, on free ports, accepting TLS only, with certificates made here. The shared RabbitMQ
node has no TLS listener and is not reconfigured: a TLS proxy in front of it (as a TLS-terminating
load balancer would be) proves the daemon's side of amqps:// (the CA, the host name, the client
certificate), RabbitMQ's own TLS listener being its configuration.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
import redis
import trio

from eventbus.backends import aio, lock, store
from eventbus.config import ConfigError, PostgresConfig, RedisConfig, load
from eventbus.errors import DependencyUnavailable
from tests.bus_client import BusClient
from tests.certs import Issued, issue, make_ca
from tests.conftest import Backends
from tests.daemon_process import DaemonProcess
from tests.servers import free_port, unique_name

# --- secrets read from files ----------------------------------------------------------------

AMQP = "amqp://eventbus:s3cret@rabbit.internal:5672/bus"
DSN = "postgresql://eventbus:s3cret@db.internal:5432/eventbus?sslmode=verify-full"
REDIS = "rediss://:s3cret@cache.internal:6380/0"


def write_config(directory: Path, text: str) -> str:
    path = directory / "config.toml"
    path.write_text(text)
    return str(path)


def test_each_url_can_come_from_a_file(tmp_path: Path) -> None:
    for name, value in (("amqp.url", AMQP), ("pg.dsn", DSN), ("redis.url", REDIS)):
        (tmp_path / name).write_text(value + "\n")  # the trailing newline is no part of it
    config = load(
        write_config(
            tmp_path,
            f'[amqp]\nurl_file = "{tmp_path}/amqp.url"\n'
            f'[postgres]\ndsn = "postgresql://ignored@x/y"\ndsn_file = "{tmp_path}/pg.dsn"\n'
            f'[redis]\nurl_file = "{tmp_path}/redis.url"\n',
        ),
        environ={},
    )
    assert (config.amqp.url, config.postgres.dsn, config.redis.url) == (AMQP, DSN, REDIS)


def test_a_relative_path_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "eventbus-dsn").write_text(DSN)
    (tmp_path / "eventbus-dsn").write_text("postgresql://not@this/one")
    path = write_config(tmp_path, '[postgres]\ndsn_file = "eventbus-dsn"\n')
    config = load(path, environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.postgres.dsn == DSN
    # The file can be named from the environment too.
    environ = {"CREDENTIALS_DIRECTORY": str(credentials), "EVENTBUS_AMQP__URL_FILE": "amqp"}
    (credentials / "amqp").write_text(AMQP)
    assert load(path, environ=environ).amqp.url == AMQP


def test_a_missing_file_is_one_line_naming_the_key_and_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[redis]\nurl_file = "redis-url"\n')
    with pytest.raises(ConfigError) as raised:
        load(path, environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")})
    message = str(raised.value)
    assert message.startswith("config.toml: redis.url_file: cannot read redis-url: ")
    assert str(tmp_path / "credentials" / "redis-url") in message
    assert "\n" not in message
    done = subprocess.run(
        [sys.executable, "-m", "eventbus", "serve", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CREDENTIALS_DIRECTORY": str(tmp_path / "credentials")},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("eventbus: config.toml: redis.url_file: cannot read redis-url")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_file_must_hold_what_the_key_takes(tmp_path: Path) -> None:
    (tmp_path / "amqp.url").write_text("postgresql://wrong@scheme/here")
    path = write_config(tmp_path, f'[amqp]\nurl_file = "{tmp_path}/amqp.url"\n')
    with pytest.raises(ConfigError, match=r"amqp\.url_file: the file must hold an amqp:// URL"):
        load(path, environ={})


def test_a_daemon_reads_its_dsn_from_a_credential(
    make_daemon: Any, backends: Backends, tmp_path: Path
) -> None:
    """As under systemd: the file in $CREDENTIALS_DIRECTORY, config.toml naming it alone."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "eventbus-dsn").write_text(backends.postgres_dsn)
    daemon: DaemonProcess = make_daemon(
        postgres={"dsn": "postgresql://nobody@127.0.0.1:1/nothing", "dsn_file": "eventbus-dsn"},
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    client.publish("secrets.q", "hello")
    assert client.subscribe("secrets.q").data == "hello"
    assert f"PostgreSQL: connected to {backends.postgres_dsn}" in daemon.log


# --- servers of our own, TLS only -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Issued]]:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "dependencies CA")
    foreign = make_ca(directory / "foreign", "foreign CA")
    yield {
        "ca": ca,
        "server": issue(ca, "localhost"),
        "client": issue(ca, "eventbus", client=True),
        "foreign": foreign,
    }


@dataclass
class TlsPostgres:
    """A PostgreSQL cluster of our own: TLS only on 127.0.0.1:port, trust on its socket."""

    port: int
    socket_dir: str

    def dsn(self, database: str, query: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}?{query}"

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """A query over the socket (no TLS), to look at the TLS connections from inside."""
        connection = await asyncpg.connect(
            host=self.socket_dir, port=self.port, user="postgres", database="postgres"
        )
        try:
            return await connection.fetch(sql, *args)
        finally:
            await connection.close()


def postgres_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if os.geteuid() != 0 or not found or shutil.which("runuser") is None:
        pytest.skip("needs root, runuser and PostgreSQL's server binaries")
    return found[-1]


def as_postgres(*command: str) -> None:
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def tls_postgres(pki: dict[str, Issued]) -> Iterator[TlsPostgres]:
    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    home = tempfile.mkdtemp(prefix="eventbus-tls-pg-")  # /tmp: the postgres user can reach it
    user = pwd.getpwnam("postgres")
    os.chown(home, user.pw_uid, user.pw_gid)
    data, port = os.path.join(home, "data"), free_port()
    as_postgres(initdb, "-D", data, "-U", "postgres", "--auth=trust", "--no-sync", "--no-locale")
    server = pki["server"]
    for source, name in ((server.cert_file, "server.crt"), (server.key_file, "server.key")):
        target = shutil.copy(source, os.path.join(data, name))  # the key: postgres's, 0600
        os.chown(target, user.pw_uid, user.pw_gid)
        os.chmod(target, 0o600)
    with open(os.path.join(data, "postgresql.conf"), "a") as conf:
        conf.write(
            f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{home}'\n"
            "ssl = on\nfsync = off\nmax_connections = 50\nshared_buffers = '16MB'\n"
        )
    with open(os.path.join(data, "pg_hba.conf"), "w") as hba:  # TCP only with TLS
        hba.write("local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
    as_postgres(pg_ctl, "-D", data, "-l", os.path.join(home, "log"), "-w", "-t", "60", "start")
    try:
        yield TlsPostgres(port, home)
    finally:
        as_postgres(pg_ctl, "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class TlsRedis:
    port: int

    def url(self, pki: dict[str, Issued], *, ca: str = "ca", client: bool = True) -> str:
        query = f"ssl_ca_certs={pki[ca].cert_file}"
        if client:
            query += f"&ssl_certfile={pki['client'].cert_file}&ssl_keyfile={pki['client'].key_file}"
        return f"rediss://127.0.0.1:{self.port}/0?{query}"


@pytest.fixture(scope="module")
def tls_redis(
    pki: dict[str, Issued], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRedis]:
    """A redis-server of our own with only a TLS port, asking clients for a certificate."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    directory, port = tmp_path_factory.mktemp("redis"), free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(pki["server"].cert_file),
            "--tls-key-file", str(pki["server"].key_file),
            "--tls-ca-cert-file", str(pki["ca"].cert_file),
            "--tls-auth-clients", "yes",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        tls = TlsRedis(port)
        _wait_for(lambda: redis.Redis.from_url(tls.url(pki)).ping(), server)
        yield tls
    finally:
        server.terminate()
        server.wait(10)


def _wait_for(probe: Any, server: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            output = server.stdout.read().decode() if server.stdout else ""
            pytest.skip(f"redis-server with TLS did not start: {output[-500:]}")
        try:
            probe()
            return
        except (OSError, redis.exceptions.ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class TlsProxy:
    """TLS on a port of our own, each connection passed on to a plain TCP address: the shared
    RabbitMQ, as behind a TLS-terminating load balancer. Counts completed handshakes."""

    def __init__(self, server: Issued, target: tuple[str, int], client_ca: Path) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(server.cert_file, server.key_file)
        self.context.load_verify_locations(client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.target = target
        self.handshakes = 0
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the TLS proxy did not start"

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                serve = partial(trio.serve_ssl_over_tcp, host="127.0.0.1")
                listeners = await nursery.start(serve, self._relay, 0, self.context)
                self.port = listeners[0].transport_listener.socket.getsockname()[1]
                self._ready.set()

    async def _relay(self, client: trio.SSLStream[trio.SocketStream]) -> None:
        try:
            await client.do_handshake()
        except trio.BrokenResourceError:
            return
        self.handshakes += 1
        upstream = await trio.open_tcp_stream(*self.target)
        async with client, upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)

    def close(self) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


async def _pump(source: Any, sink: Any, both: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        both.cancel()


@pytest.fixture
def amqps_proxy(pki: dict[str, Issued]) -> Iterator[TlsProxy]:
    proxy = TlsProxy(pki["server"], ("127.0.0.1", 5672), pki["ca"].cert_file)
    yield proxy
    proxy.close()


# --- PostgreSQL over TLS --------------------------------------------------------------------


SSL_OF_THIS_CONNECTION = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"
SSL_OF_CLIENTS = """
    select s.ssl from pg_stat_activity a join pg_stat_ssl s using (pid)
    where a.backend_type = 'client backend' and a.datname = $1 and a.pid <> pg_backend_pid()
"""


async def test_the_store_verifies_postgresql_and_talks_tls(
    tls_postgres: TlsPostgres, pki: dict[str, Issued]
) -> None:
    database = unique_name("eventbus_tls")
    await aio_fetch(tls_postgres, f'create database "{database}"')
    query = f"sslmode=verify-full&sslrootcert={pki['ca'].cert_file}"
    async with aio.open_loop(lambda: None):
        db = await store.open_store(PostgresConfig(dsn=tls_postgres.dsn(database, query)), 10)
        try:
            (row,) = await db.fetch(SSL_OF_THIS_CONNECTION)
            assert row["ssl"] and row["version"] in ("TLSv1.2", "TLSv1.3")
            clients = await aio.call(tls_postgres.fetch, SSL_OF_CLIENTS, database)
            assert clients and all(client["ssl"] for client in clients)
        finally:
            await db.close()


async def aio_fetch(postgres: TlsPostgres, sql: str) -> None:
    async with aio.open_loop(lambda: None):
        await aio.call(postgres.fetch, sql)


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("sslmode=verify-full&sslrootcert={foreign}", "certificate verify failed"),
        ("sslmode=disable", "no encryption"),
    ],
)
async def test_the_store_refuses_a_server_it_cannot_trust(
    tls_postgres: TlsPostgres, pki: dict[str, Issued], query: str, reason: str
) -> None:
    """A certificate a foreign CA signed fails the connection; and this server takes TLS only."""
    dsn = tls_postgres.dsn("postgres", query.format(foreign=pki["foreign"].cert_file))
    async with aio.open_loop(lambda: None):
        with pytest.raises((DependencyUnavailable, asyncpg.PostgresError)) as raised:
            await store.open_store(PostgresConfig(dsn=dsn), window=1)
    assert reason in str(raised.value)


# --- Redis over TLS -------------------------------------------------------------------------


async def test_the_lock_client_verifies_redis_and_presents_its_certificate(
    tls_redis: TlsRedis, pki: dict[str, Issued]
) -> None:
    prefix = unique_name("eventbus_tls") + ":"
    config = RedisConfig(url=tls_redis.url(pki), key_prefix=prefix)
    async with aio.open_loop(lambda: None):
        client = await lock.open_redis(config, window=10)
        try:
            held = lock.RedisLock(client, "cron", ttl_seconds=30)
            assert await held.hold()
            assert not await lock.RedisLock(client, "cron", ttl_seconds=30).hold()
            await held.release()
        finally:
            await client.close()


@pytest.mark.parametrize(("ca", "client"), [("foreign", True), ("ca", False)])
async def test_the_lock_client_fails_without_trust_or_a_certificate(
    tls_redis: TlsRedis, pki: dict[str, Issued], ca: str, client: bool
) -> None:
    config = RedisConfig(url=tls_redis.url(pki, ca=ca, client=client))
    async with aio.open_loop(lambda: None):
        with pytest.raises(DependencyUnavailable, match="Redis at rediss://"):
            await lock.open_redis(config, window=1)


# --- a daemon over TLS to all three, its URLs from credentials ------------------------------


def test_a_daemon_over_tls_to_rabbitmq_postgresql_and_redis(
    make_daemon: Any,
    backends: Backends,
    tmp_path: Path,
    pki: dict[str, Issued],
    tls_postgres: TlsPostgres,
    tls_redis: TlsRedis,
    amqps_proxy: TlsProxy,
) -> None:
    database = unique_name("eventbus_tls")
    asyncio.run(tls_postgres.fetch(f'create database "{database}"'))
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    probe: DaemonProcess = make_daemon()  # not started for use: it names the test's vhost
    probe.kill()
    vhost = urlsplit(
        next(
            line for line in probe.config_path.read_text().splitlines() if "amqp://" in line
        ).split('"')[1]
    ).path
    ca, client = pki["ca"], pki["client"]
    amqps = (
        f"amqps://guest:guest@localhost:{amqps_proxy.port}{vhost}"
        f"?cafile={ca.cert_file}&certfile={client.cert_file}&keyfile={client.key_file}"
    )
    (credentials / "amqp-url").write_text(amqps)
    query = f"sslmode=verify-full&sslrootcert={ca.cert_file}"
    (credentials / "pg-dsn").write_text(tls_postgres.dsn(database, query))
    (credentials / "redis-url").write_text(tls_redis.url(pki))
    daemon: DaemonProcess = make_daemon(
        amqp={"url_file": "amqp-url"},
        postgres={"dsn_file": "pg-dsn"},
        redis={"url_file": "redis-url"},
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    daemon.wait_ready()
    bus = BusClient(daemon.grpc_address)
    bus.publish("tls.orders", "over TLS")
    message = bus.subscribe("tls.orders")
    assert message.data == "over TLS"
    bus.ack(message.id)
    clients = asyncio.run(tls_postgres.fetch(SSL_OF_CLIENTS, database))
    assert clients and all(row["ssl"] for row in clients)
    assert amqps_proxy.handshakes >= 1
    for line in ("RabbitMQ", "PostgreSQL: connected to", "Redis: connected to rediss://"):
        assert line in daemon.log
    assert daemon.stop() == 0
