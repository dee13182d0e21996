"""TLS and mTLS on the gRPC port, with certificates made for each test: the server context and
its errors, renewing certificates for new connections while open ones go on, and real daemons
answering grpcio and grpclib clients over TLS, with and without client certificates."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.server import Server

from eventbus._generated import v2_pb2
from eventbus._generated.v2_grpc import PublisherStub, SubscriberStub
from eventbus.config import TlsConfig
from eventbus.security.tls import ServerTls, TlsError, server_context
from tests.bus_client import BusClient
from tests.certs import Issued, issue, make_ca
from tests.daemon_process import auth_table, to_toml
from tests.servers import free_port, unique_name
from tests.v2_client import V2Client, message

TOKEN = "s3cret-billing-token"
ORDERS = {"certificate_subject": "CN=orders-service", "publish": ["orders.*"]}
ORDERS_SUBSCRIBE = {**ORDERS, "subscribe": ["orders.*"]}
BILLING = {
    "token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
    "publish": ["billing.*"],
    "subscribe": ["billing.*"],
}


T = TypeVar("T")


def run_plain(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run() on a plain asyncio loop: once trio-asyncio is imported (other tests of the
    run do), asyncio.run() would start its loop, on which grpclib's server finds no event loop."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(coroutine)


@pytest.fixture
def ca(tmp_path: Path) -> Issued:
    return make_ca(tmp_path / "ca", "bus CA")


@pytest.fixture
def server_cert(ca: Issued) -> Issued:
    return issue(ca, "bus server")


def tls_config(server: Issued, client_ca: Issued | None = None) -> TlsConfig:
    return TlsConfig(
        cert_file=str(server.cert_file),
        key_file=str(server.key_file),
        client_ca_file=str(client_ca.cert_file) if client_ca else "",
    )


# The server context and its errors


@pytest.mark.parametrize(
    ("with_ca", "mode", "wanted"),
    [
        (False, "off", ssl.CERT_NONE),
        (False, "token", ssl.CERT_NONE),
        (True, "mtls", ssl.CERT_REQUIRED),
        (True, "any", ssl.CERT_OPTIONAL),
        (True, "token", ssl.CERT_OPTIONAL),
        (True, "off", ssl.CERT_OPTIONAL),
    ],
)
def test_client_certificates_asked_as_the_mode_says(
    ca: Issued, server_cert: Issued, with_ca: bool, mode: str, wanted: ssl.VerifyMode
) -> None:
    context = server_context(tls_config(server_cert, ca if with_ca else None), mode)
    assert context.verify_mode == wanted
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    # No resumption: a resumed session skips the client certificate check after a reload.
    assert context.options & ssl.OP_NO_TICKET and context.num_tickets == 0
    # Only the configured CA vouches for clients, never the system's store.
    assert [c["subject"] for c in context.get_ca_certs()] == (
        [((("commonName", "bus CA"),),)] if with_ca else []
    )


def test_unreadable_file_is_named(ca: Issued, server_cert: Issued, tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    config = TlsConfig(cert_file=str(server_cert.cert_file), key_file=str(missing))
    with pytest.raises(TlsError, match=rf"^tls\.key_file: cannot read {missing}: No such file"):
        server_context(config, "off")


def test_key_of_another_certificate_is_refused(ca: Issued, server_cert: Issued) -> None:
    other = issue(ca, "other server")
    config = TlsConfig(cert_file=str(server_cert.cert_file), key_file=str(other.key_file))
    with pytest.raises(TlsError, match=r"^tls\.key_file: .* is not the key of tls\.cert_file"):
        server_context(config, "off")


@pytest.mark.parametrize("key", ["tls.cert_file", "tls.key_file", "tls.client_ca_file"])
def test_file_without_pem_is_named(
    ca: Issued, server_cert: Issued, tmp_path: Path, key: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    files = {
        "cert_file": str(server_cert.cert_file),
        "key_file": str(server_cert.key_file),
        "client_ca_file": str(ca.cert_file),
    }
    files[key.removeprefix("tls.")] = str(garbage)
    config = TlsConfig(files["cert_file"], files["key_file"], files["client_ca_file"])
    with pytest.raises(TlsError, match=rf"^{key}: {garbage} holds no"):
        server_context(config, "mtls")


def test_encrypted_key_is_refused_without_prompting(server_cert: Issued, tmp_path: Path) -> None:
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        server_cert.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    config = TlsConfig(cert_file=str(server_cert.cert_file), key_file=str(locked))
    with pytest.raises(TlsError, match=r"^tls\.key_file: the key is encrypted"):
        server_context(config, "off")


def test_daemon_with_a_bad_tls_file_exits_with_one_line(
    tmp_path: Path, server_cert: Issued
) -> None:
    config = tmp_path / "config.toml"
    missing = tmp_path / "gone.crt"
    config.write_text(
        to_toml(
            {
                "server": {"grpc_port": free_port(), "http_port": free_port()},
                "tls": {"cert_file": str(missing), "key_file": str(server_cert.key_file)},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "eventbus", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and f"tls.cert_file: cannot read {missing}" in lines[0], lines
    assert "Traceback" not in done.stderr


# Renewing certificates: a grpclib server with the health service, as the daemon serves it


def client_context(ca: Issued, client: Issued | None = None) -> ssl.SSLContext:
    """What a grpclib client passes as Channel(ssl=...): trust ca, present client if given."""
    context = ssl.create_default_context(cafile=ca.cert_file)
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    return context


async def health(channel: Channel) -> int:
    reply = await HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
    return reply.status


async def refused(port: int, context: ssl.SSLContext) -> bool:
    """Whether a new connection with context fails (its handshake, or the server closes it)."""
    channel = Channel("127.0.0.1", port, ssl=context)
    try:
        await health(channel)
    except (OSError, StreamTerminatedError):
        return True
    finally:
        channel.close()
    return False


async def serving(tls: ServerTls) -> tuple[Server, int]:
    server = Server([Health()])
    port = free_port()
    await server.start("127.0.0.1", port, ssl=tls.context)
    return server, port


def test_reload_renews_the_certificate_for_new_connections(tmp_path: Path) -> None:
    old_ca, new_ca = make_ca(tmp_path, "old CA"), make_ca(tmp_path, "new CA")
    tls = ServerTls(tls_config(issue(old_ca, "server")), "off")

    async def scenario() -> None:
        server, port = await serving(tls)
        before = Channel("127.0.0.1", port, ssl=client_context(old_ca))
        try:
            assert await health(before) == HealthCheckResponse.SERVING
            tls.reload(tls_config(issue(new_ca, "server")), "off")
            after = Channel("127.0.0.1", port, ssl=client_context(new_ca))
            assert await health(after) == HealthCheckResponse.SERVING
            after.close()
            assert await refused(port, client_context(old_ca))  # the old certificate is gone
            assert await health(before) == HealthCheckResponse.SERVING  # still open, still served
        finally:
            before.close()
            server.close()
            await server.wait_closed()

    run_plain(scenario())


def test_reload_with_broken_files_keeps_the_running_context(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "CA")
    tls = ServerTls(tls_config(issue(ca, "server")), "off")
    broken = TlsConfig(cert_file=str(issue(ca, "next").cert_file), key_file=str(tmp_path / "no"))
    with pytest.raises(TlsError, match=r"^tls\.key_file: cannot read"):
        tls.reload(broken, "off")

    async def scenario() -> None:
        server, port = await serving(tls)
        channel = Channel("127.0.0.1", port, ssl=client_context(ca))
        try:
            assert await health(channel) == HealthCheckResponse.SERVING
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    run_plain(scenario())


def test_reload_changes_the_client_ca_and_whether_a_certificate_is_required(
    tmp_path: Path,
) -> None:
    ca, clients_ca, foreign = (make_ca(tmp_path, n) for n in ("CA", "clients CA", "foreign CA"))
    server = issue(ca, "server")
    member = issue(clients_ca, "orders-service", client=True)
    stranger = issue(foreign, "orders-service", client=True)
    tls = ServerTls(tls_config(server), "token")  # no client CA: nobody is asked

    async def scenario() -> None:
        grpc_server, port = await serving(tls)
        try:
            assert not await refused(port, client_context(ca))
            tls.reload(tls_config(server, clients_ca), "mtls")
            assert await refused(port, client_context(ca))  # no certificate
            assert await refused(port, client_context(ca, stranger))
            assert not await refused(port, client_context(ca, member))
            tls.reload(tls_config(server, foreign), "any")
            assert not await refused(port, client_context(ca))  # optional now
            assert await refused(port, client_context(ca, member))  # a sent one must chain
            assert not await refused(port, client_context(ca, stranger))
        finally:
            grpc_server.close()
            await grpc_server.wait_closed()

    run_plain(scenario())


# Real daemons


def secure_v2(
    address: str, ca: Issued, client: Issued | None = None, token: str | None = None
) -> V2Client:
    """A grpcio v2 client trusting ca, presenting client's certificate and token if given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    if token is not None:
        credentials = grpc.composite_channel_credentials(
            credentials, grpc.access_token_call_credentials(token)
        )
    v2 = V2Client(address)
    v2.channel.close()
    v2.channel = grpc.secure_channel(address, credentials)
    return v2


def round_trip(v2: V2Client, queue: str) -> bytes:
    """Publish one message to queue and pull it back; its data."""
    v2.publish(message(queue, b"over tls"))
    request = v2_pb2.PullRequest(queue=queue, max_messages=1, wait_seconds=5)
    pulled = v2._unary("/eventbus.v2.Subscriber/Pull", request, v2_pb2.PullResponse, timeout=15)
    [received] = pulled.messages
    assert v2.acknowledge([received.ack_id]) == []
    return bytes(received.data)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Issued]:
    ca, foreign = make_ca(tmp_path / "pki", "bus CA"), make_ca(tmp_path / "foreign", "other CA")
    yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    return {
        "ca": ca,
        "server": issue(ca, "bus"),
        "orders": issue(ca, "orders-service", client=True),
        "expired": issue(ca, "orders-service", client=True, not_after=yesterday),
        "foreign": issue(foreign, "orders-service", client=True),
        "nobody": issue(ca, "stranger", client=True),
    }


def started(make_daemon: Any, pki: dict[str, Issued], mode: str, **identities: Any) -> Any:
    tls = {
        "cert_file": str(pki["server"].cert_file),
        "key_file": str(pki["server"].key_file),
        "client_ca_file": str(pki["ca"].cert_file),
    }
    daemon = make_daemon(tls=tls, auth=auth_table(mode, **identities))
    daemon.wait_ready()
    return daemon


@pytest.fixture
def mtls_daemon(make_daemon: Any, pki: dict[str, Issued]) -> Any:
    return started(make_daemon, pki, "mtls", orders_service=ORDERS_SUBSCRIBE)


@pytest.fixture
def any_daemon(make_daemon: Any, pki: dict[str, Issued]) -> Any:
    return started(make_daemon, pki, "any", orders_service=ORDERS_SUBSCRIBE, billing=BILLING)


@pytest.fixture
def clients() -> Iterator[list[V2Client]]:
    opened: list[V2Client] = []
    yield opened
    for client in opened:
        client.close()


def test_mtls_with_grpcio(
    mtls_daemon: Any, pki: dict[str, Issued], clients: list[V2Client]
) -> None:
    address, ca = mtls_daemon.grpc_address, pki["ca"]

    def as_(client: Issued | None) -> V2Client:
        clients.append(secure_v2(address, ca, client))
        return clients[-1]

    orders = as_(pki["orders"])
    queue = unique_name("orders.tls")
    assert round_trip(orders, queue) == b"over tls"
    assert (
        code_of(lambda: orders.publish(message("billing.x"))) == grpc.StatusCode.PERMISSION_DENIED
    )
    for refused_cert in (None, pki["expired"], pki["foreign"]):
        assert code_of(lambda c=refused_cert: as_(c).publish(message(queue))) == (
            grpc.StatusCode.UNAVAILABLE
        ), refused_cert
    nobody = as_(pki["nobody"])
    with pytest.raises(grpc.RpcError) as raised:
        nobody.publish(message(queue))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "CN=stranger" in (raised.value.details() or "")
    plain = V2Client(address)
    clients.append(plain)
    assert code_of(lambda: plain.publish(message(queue))) == grpc.StatusCode.UNAVAILABLE


async def grpclib_calls(port: int, ca: Issued, client: Issued | None, queue: str) -> Any:
    """Publish to queue and pull it back with grpclib; the data, or the error raised."""
    channel = Channel("127.0.0.1", port, ssl=client_context(ca, client))
    try:
        await PublisherStub(channel).Publish(
            v2_pb2.PublishRequest(messages=[message(queue, b"grpclib")]), timeout=10
        )
        reply = await SubscriberStub(channel).Pull(
            v2_pb2.PullRequest(queue=queue, max_messages=1, wait_seconds=5), timeout=15
        )
        return [bytes(m.data) for m in reply.messages]
    except (OSError, GRPCError, StreamTerminatedError) as error:
        return error
    finally:
        channel.close()


def test_mtls_with_grpclib(mtls_daemon: Any, pki: dict[str, Issued]) -> None:
    port, ca, queue = mtls_daemon.grpc_port, pki["ca"], unique_name("orders.grpclib")
    assert run_plain(grpclib_calls(port, ca, pki["orders"], queue)) == [b"grpclib"]
    denied = run_plain(grpclib_calls(port, ca, pki["orders"], "audit"))
    assert isinstance(denied, GRPCError) and denied.status == Status.PERMISSION_DENIED
    for refused_cert in (None, pki["expired"], pki["foreign"]):
        # TLS 1.3: the client's handshake is over when the server refuses its certificate.
        outcome = run_plain(grpclib_calls(port, ca, refused_cert, queue))
        assert isinstance(outcome, (ssl.SSLError, StreamTerminatedError)), refused_cert
    # The server's certificate is checked too: a client trusting another CA goes no further.
    outcome = run_plain(grpclib_calls(port, make_ca(ca.directory / "x", "x"), None, queue))
    assert isinstance(outcome, ssl.SSLCertVerificationError)


def test_any_takes_a_token_or_a_certificate(
    any_daemon: Any, pki: dict[str, Issued], clients: list[V2Client]
) -> None:
    address, ca = any_daemon.grpc_address, pki["ca"]
    clients.append(billing := secure_v2(address, ca, token=TOKEN))
    assert round_trip(billing, unique_name("billing.tls")) == b"over tls"
    assert (
        code_of(lambda: billing.publish(message("orders.x"))) == grpc.StatusCode.PERMISSION_DENIED
    )
    clients.append(orders := secure_v2(address, ca, pki["orders"]))
    assert round_trip(orders, unique_name("orders.tls")) == b"over tls"
    clients.append(anonymous := secure_v2(address, ca))
    assert code_of(lambda: anonymous.publish(message("orders.x"))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    clients.append(foreign := secure_v2(address, ca, pki["foreign"], token=TOKEN))
    assert code_of(lambda: foreign.publish(message("billing.x"))) == grpc.StatusCode.UNAVAILABLE


def test_v1_over_tls_with_a_token(any_daemon: Any, pki: dict[str, Issued]) -> None:
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert_pem),
        grpc.access_token_call_credentials(TOKEN),
    )
    v1 = BusClient(any_daemon.grpc_address)
    v1.channel.close()
    v1.channel = grpc.secure_channel(any_daemon.grpc_address, credentials)
    try:
        queue = unique_name("billing.v1")
        v1.publish(queue, "hello")
        received = v1.subscribe(queue)
        assert received.data == "hello"
        v1.ack(received.id)
    finally:
        v1.channel.close()
