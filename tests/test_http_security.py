"""The operators' HTTP port: with auth on, /metrics and /stats need an admin's bearer token while
/healthz and /readyz stay open; HTTPS with tls.http; the one warning at start when gRPC is open
to the network without auth. Real daemons, and the application alone for the refusal rules."""

from __future__ import annotations

import hashlib
import signal
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from eventbus.api import http
from eventbus.config import AuthConfig, Config, ConfigError, IdentityConfig, load
from eventbus.ops.metrics import Metrics
from eventbus.security.access import Access
from tests.certs import Issued, issue, make_ca
from tests.daemon_process import DaemonProcess

ADMIN_TOKEN = "admin-token-for-tests"
READER_TOKEN = "reader-token-for-tests"
OPEN_WARNING = "auth.mode is off and gRPC listens on"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def identities(mode: str = "token") -> dict[str, Any]:
    """[auth] with an admin "ops" and a non-admin "reader", as dotted keys for to_toml."""
    return {
        "mode": mode,
        "identities.ops.token_sha256": sha256(ADMIN_TOKEN),
        "identities.ops.admin": True,
        "identities.ops.certificate_subject": "CN=ops",
        "identities.reader.token_sha256": sha256(READER_TOKEN),
        "identities.reader.subscribe": ["*"],
    }


def get(
    url: str, token: str | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


# --- the application alone ------------------------------------------------------------------


async def asgi_get(app: Any, path: str, authorization: str | None = None) -> tuple[int, str]:
    """One GET through the ASGI application, as hypercorn would pass it."""
    headers = [(b"authorization", authorization.encode())] if authorization else []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("192.0.2.7", 40000),
        "server": ("127.0.0.1", 7878),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body.decode()


def access_of(mode: str, *identities: IdentityConfig) -> Access:
    return Access(AuthConfig(mode, identities))


OPS = IdentityConfig("ops", token_sha256=sha256(ADMIN_TOKEN), admin=True)
READER = IdentityConfig("reader", token_sha256=sha256(READER_TOKEN), subscribe=("*",))


def app_with(access: Any, metrics: Metrics | None = None) -> Any:
    async def stats() -> dict[str, Any]:
        return {"queues": {"orders": 1}}

    return http.make_app({}, metrics or Metrics("test"), stats, access)


@pytest.mark.parametrize("mode", ["token", "any", "mtls"])
async def test_admin_pages_need_an_admins_token_in_every_mode(mode: str) -> None:
    """mtls too: HTTP cannot see a client certificate, so an admin's token is what it takes."""
    metrics = Metrics("test")
    app = app_with(lambda: access_of(mode, OPS, READER), metrics)
    for page in ("/metrics", "/stats"):
        assert (await asgi_get(app, page))[0] == 401
        assert await asgi_get(app, page, "Bearer nonsense") == (401, "unknown token\n")
        assert (await asgi_get(app, page, f"Basic {ADMIN_TOKEN}"))[0] == 401
        status, body = await asgi_get(app, page, f"Bearer {READER_TOKEN}")
        assert (status, body) == (403, "identity 'reader' lacks the admin permission\n")
        assert (await asgi_get(app, page, f"Bearer {ADMIN_TOKEN}"))[0] == 200
        assert (await asgi_get(app, page, f"bearer {ADMIN_TOKEN}"))[0] == 200
    for page in ("/healthz", "/readyz"):
        assert (await asgi_get(app, page))[0] == 200
    refused = metrics.registry.get_sample_value
    labels = {"method": "HTTP /stats", "code": "UNAUTHENTICATED"}
    assert refused("eventbus_auth_refusals_total", labels) == 3
    labels = {"method": "HTTP /metrics", "code": "PERMISSION_DENIED"}
    assert refused("eventbus_auth_refusals_total", labels) == 1


async def test_auth_off_leaves_every_page_open() -> None:
    for access in (lambda: None, lambda: access_of("off")):
        app = app_with(access)
        for page in ("/metrics", "/stats", "/healthz"):
            assert (await asgi_get(app, page))[0] == 200


async def test_the_access_in_force_is_asked_at_each_request() -> None:
    """A reload swaps the access object: a revoked token fails at its next request, a new
    admin's works at once."""
    current = [access_of("token", OPS, READER)]
    app = app_with(lambda: current[0])
    assert (await asgi_get(app, "/stats", f"Bearer {ADMIN_TOKEN}"))[0] == 200
    promoted = IdentityConfig("reader", token_sha256=sha256(READER_TOKEN), admin=True)
    current[0] = access_of("token", promoted)
    assert (await asgi_get(app, "/stats", f"Bearer {ADMIN_TOKEN}"))[0] == 401
    assert (await asgi_get(app, "/stats", f"Bearer {READER_TOKEN}"))[0] == 200


def test_http_binds_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("")
    assert load(str(tmp_path / "config.toml"), environ={}).server.http_host == "127.0.0.1"
    assert Config().server.http_host == "127.0.0.1"


# --- real daemons ---------------------------------------------------------------------------


def test_a_daemon_with_tokens_guards_metrics_and_stats(make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon(auth=identities())
    daemon.wait_ready()
    base = f"http://127.0.0.1:{daemon.http_port}"
    assert get(f"{base}/healthz")[0] == 200
    assert get(f"{base}/readyz")[0] == 200
    for page in ("/metrics", "/stats"):
        status, headers, _ = get(base + page)
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="eventbus"'
        assert get(base + page, "not-a-token")[0] == 401
        assert get(base + page, READER_TOKEN)[0] == 403
        assert get(base + page, ADMIN_TOKEN)[0] == 200
    _, _, metrics = get(f"{base}/metrics", ADMIN_TOKEN)
    assert 'eventbus_auth_refusals_total{code="PERMISSION_DENIED",method="HTTP /stats"} 1.0' in (
        metrics
    )
    assert "auth: identity reader from 127.0.0.1:" in daemon.log
    assert OPEN_WARNING not in daemon.log  # gRPC on loopback


def test_a_daemon_with_auth_off_serves_stats_to_anyone(make_daemon: Any) -> None:
    daemon: DaemonProcess = make_daemon()
    daemon.wait_ready()
    assert daemon.http_get("/stats")[0] == 200
    assert daemon.http_get("/metrics")[0] == 200
    assert OPEN_WARNING not in daemon.log


def test_one_warning_when_grpc_is_open_to_the_network_without_auth(make_daemon: Any) -> None:
    open_daemon: DaemonProcess = make_daemon(server={"grpc_host": "0.0.0.0"})
    guarded: DaemonProcess = make_daemon(server={"grpc_host": "0.0.0.0"}, auth=identities())
    open_daemon.wait_ready()
    guarded.wait_ready()
    warnings = [line for line in open_daemon.log.splitlines() if OPEN_WARNING in line]
    assert len(warnings) == 1, open_daemon.log
    assert "WARNING" in warnings[0] and f"port {open_daemon.grpc_port}" in warnings[0]
    assert OPEN_WARNING not in guarded.log


# --- HTTPS ----------------------------------------------------------------------------------


def client_context(ca: Issued, certificate: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    if certificate is not None:
        context.load_cert_chain(certificate.cert_file, certificate.key_file)
    return context


def wait_ready_https(daemon: DaemonProcess, context: ssl.SSLContext, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited {daemon.process.returncode}:\n{daemon.log}")
        try:
            if get(f"https://127.0.0.1:{daemon.http_port}/readyz", context=context)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"daemon not ready over HTTPS after {timeout} s:\n{daemon.log}")


def tls_files(ca: Issued, server: Issued, **more: Any) -> dict[str, Any]:
    return {"cert_file": str(server.cert_file), "key_file": str(server.key_file), **more}


def test_https_with_tls_http(make_daemon: Any, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    daemon: DaemonProcess = make_daemon(
        tls=tls_files(ca, issue(ca, "localhost"), http=True), auth=identities()
    )
    trusting = client_context(ca)
    wait_ready_https(daemon, trusting)
    base = f"https://127.0.0.1:{daemon.http_port}"
    assert get(f"{base}/healthz", context=trusting)[0] == 200
    assert get(f"{base}/stats", context=trusting)[0] == 401
    assert get(f"{base}/stats", ADMIN_TOKEN, context=trusting)[0] == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"{base}/healthz", context=ssl.create_default_context())  # the system's CAs only
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(f"http://127.0.0.1:{daemon.http_port}/healthz")  # no plain HTTP on the port


def test_https_in_mtls_mode_needs_a_client_certificate_and_an_admin_token(
    make_daemon: Any, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "pki")
    foreign = make_ca(tmp_path / "foreign", "foreign CA")
    daemon: DaemonProcess = make_daemon(
        tls=tls_files(ca, issue(ca, "localhost"), http=True, client_ca_file=str(ca.cert_file)),
        auth=identities("mtls"),
    )
    ops = client_context(ca, issue(ca, "ops", client=True))
    wait_ready_https(daemon, ops)
    base = f"https://127.0.0.1:{daemon.http_port}"
    assert get(f"{base}/healthz", context=ops)[0] == 200
    assert get(f"{base}/metrics", context=ops)[0] == 401
    assert get(f"{base}/metrics", ADMIN_TOKEN, context=ops)[0] == 200
    for context in (client_context(ca), client_context(ca, issue(foreign, "ops", client=True))):
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            get(f"{base}/healthz", ADMIN_TOKEN, context=context)


def test_tls_http_without_a_certificate_is_refused_at_load(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[tls]\nhttp = true\n")
    with pytest.raises(ConfigError, match=r"tls\.http: needs tls\.cert_file and tls\.key_file"):
        load(str(path), environ={})


def test_a_reload_renews_the_https_certificate(make_daemon: Any, tmp_path: Path) -> None:
    """HTTPS serves with the gRPC port's context: SIGHUP's renewal reaches it as well."""
    old_ca, new_ca = make_ca(tmp_path / "old", "old CA"), make_ca(tmp_path / "new", "new CA")
    cert_file, key_file = tmp_path / "server.crt", tmp_path / "server.key"

    def install(ca: Issued) -> None:
        server = issue(ca, "localhost")
        cert_file.write_bytes(server.cert_pem)
        key_file.write_bytes(server.key_pem)

    install(old_ca)
    daemon: DaemonProcess = make_daemon(
        tls={"cert_file": str(cert_file), "key_file": str(key_file), "http": True}
    )
    wait_ready_https(daemon, client_context(old_ca))
    install(new_ca)
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "tls: certificates reloaded" not in daemon.log:
        assert time.monotonic() < deadline, daemon.log
        time.sleep(0.1)
    url = f"https://127.0.0.1:{daemon.http_port}/healthz"
    assert get(url, context=client_context(new_ca))[0] == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(url, context=client_context(old_ca))
