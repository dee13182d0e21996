"""HTTP for operators: /healthz, /readyz, /metrics and /stats, served by hypercorn on trio.

/readyz is 200 while no check raises; a check may instead report its part degraded (working,
but with a reason operators should see), which keeps the node ready and names the reason.

With auth.mode other than "off", /metrics and /stats (queue names, counts) need the bearer token
of an identity with admin = true; /healthz and /readyz stay open for load balancers. With
tls.http the port serves HTTPS with the gRPC port's context (certificate, client CA, renewal).
"""

from __future__ import annotations

import copy
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from ..backends.retry import describe
from ..errors import Unauthenticated
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from ..security.access import NOBODY, Access, Identity, Permission

logger = logging.getLogger(__name__)
# Refusals with who, from where, what: at most one line a minute per page and reason.
audit = RateLimitedLog(logging.getLogger("eventbus.audit"))

CHECK_TIMEOUT = 2.0
GRACEFUL_TIMEOUT = 3.0
TLS_HANDSHAKE_TIMEOUT = 10.0

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: raises when its part is down (/readyz 503); returns a reason when its
part works but is degraded (/readyz still 200, the reason under "degraded"); None when well."""
Page = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Readiness:
    """What the checks found: {name: why} for the parts down, and for those degraded."""

    down: dict[str, str]
    degraded: dict[str, str]

    def body(self) -> dict[str, Any]:
        """/readyz's JSON; "degraded" only appears when a part is."""
        body: dict[str, Any] = {"ready": not self.down, "down": self.down}
        if self.degraded:
            body["degraded"] = self.degraded
        return body


async def check_readiness(checks: Mapping[str, Check]) -> Readiness:
    """Run every readiness check at once, each for at most CHECK_TIMEOUT seconds."""
    readiness = Readiness({}, {})

    async def run_one(name: str, check: Check) -> None:
        try:
            with trio.fail_after(CHECK_TIMEOUT):
                reason = await check()
        except Exception as error:
            readiness.down[name] = describe(error)
            return
        if reason:
            readiness.degraded[name] = reason

    async with trio.open_nursery() as nursery:
        for name, check in checks.items():
            nursery.start_soon(run_one, name, check)
    return readiness


def make_app(
    checks: Mapping[str, Check],
    metrics: Metrics,
    stats: Callable[[], Awaitable[dict[str, Any]]],
    access: Callable[[], Access | None] = lambda: None,
    pages: Sequence[BaseRoute] = (),
) -> Starlette:
    """The ASGI application; checks name what /readyz requires, stats() feeds /stats, access()
    (asked at each request, so a reload's takes effect) guards /metrics and /stats; pages are
    served beside them (the admin page at /ui, when it is on)."""

    async def healthz(_: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_: Request) -> Response:
        readiness = await check_readiness(checks)
        for name in checks:
            metrics.dependency_up.labels(name).set(0 if name in readiness.down else 1)
        return JSONResponse(readiness.body(), status_code=503 if readiness.down else 200)

    async def metrics_page(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def stats_page(_: Request) -> Response:
        return JSONResponse(await stats())

    def admin_only(page: Page) -> Page:
        async def guarded(request: Request) -> Response:
            refusal = admitted(request, access(), metrics)
            return refusal if refusal is not None else await page(request)

        return guarded

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", admin_only(metrics_page)),
            Route("/stats", admin_only(stats_page)),
            *pages,
        ]
    )


def admitted(request: Request, access: Access | None, metrics: Metrics) -> Response | None:
    """None when the request may see an admin page; else the refusal to send: 401 without a
    token or with one no identity holds, 403 for an identity without admin."""
    found = admin_of(request, request.headers.get("authorization"), access, metrics)
    return found if isinstance(found, Response) else None


def admin_of(
    request: Request, authorization: str | None, access: Access | None, metrics: Metrics
) -> Identity | Response:
    """The admin identity an authorization value ("Bearer TOKEN") names (NOBODY with auth
    off), or the refusal to send, counted and logged: 401 without a token or with one no
    identity holds, 403 for an identity without admin."""
    if access is None or not access.enabled:
        return NOBODY
    try:
        if authorization is None:
            raise Unauthenticated("this page needs an admin's bearer token")
        identity = _by_token(access).authenticate({"authorization": authorization}, None)
    except Unauthenticated as error:
        refused(request, metrics, "a caller", "UNAUTHENTICATED", error.message)
        return PlainTextResponse(
            f"{error.message}\n", 401, headers={"WWW-Authenticate": 'Bearer realm="eventbus"'}
        )
    if identity.may(Permission.ADMIN):
        return identity
    reason = f"identity {identity.name!r} lacks the admin permission"
    refused(request, metrics, f"identity {identity.name}", "PERMISSION_DENIED", reason)
    return PlainTextResponse(f"{reason}\n", 403)


def _by_token(access: Access) -> Access:
    """access, taking bearer tokens whatever auth.mode says: hypercorn does not hand the
    application the client's certificate, so a token is how HTTP tells an admin apart."""
    if access.mode in ("token", "any"):
        return access
    tokens = copy.copy(access)  # shares the identities; only the mode differs
    tokens.mode = "token"
    return tokens


def refused(request: Request, metrics: Metrics, who: str, code: str, reason: str) -> None:
    """Count and log (at most once a minute per page, code and caller) a refused request."""
    page = f"HTTP {request.url.path}"
    metrics.auth_refusals.labels(page, code).inc()
    message = "auth: %s from %s: %s refused: %s"
    audit.warning(f"{page} {code} {who}", message, who, peer_of(request), page, reason)


def peer_of(request: Request) -> str:
    """The client's address as host:port, for log lines."""
    client = request.client
    return f"{client.host}:{client.port}" if client else "a client"


def bounded_config(tls: ssl.SSLContext | None = None) -> HypercornConfig:
    """hypercorn's settings for a port that only operators and scrapers use: every request is
    a small GET, so headers, bodies, streams and waits are kept short. With tls, HTTPS."""
    config = HypercornConfig() if tls is None else _Tls(tls)
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT
    config.keep_alive_timeout = 5.0  # an idle connection (also before its first request)
    config.read_timeout = 10  # a request that stops sending midway
    config.keep_alive_max_requests = 1000
    config.h11_max_incomplete_size = 8 * 1024  # request line and headers
    config.h2_max_concurrent_streams = 16
    config.h2_max_header_list_size = 8 * 1024
    config.max_app_queue_size = 4
    config.backlog = 128
    return config


async def run(
    app: Starlette,
    host: str,
    port: int,
    shutdown: trio.Event,
    *,
    tls: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve app on host:port (HTTPS with a tls context) until shutdown is set; in-flight
    requests get GRACEFUL_TIMEOUT."""
    config = bounded_config(tls)
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
    logger.info("HTTP: stopped")


class _Tls(HypercornConfig):
    """hypercorn's settings serving over a given context (the gRPC port's, whose certificates
    a reload renews for new connections here too) rather than one built from file names."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__()
        self._context = context

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._context
