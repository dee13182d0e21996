"""HTTP for operators: /healthz, /readyz, /metrics and /stats, served by hypercorn on trio.

/readyz is 200 while no check raises; a check may instead report its part degraded (working,
but with a reason operators should see), which keeps the node ready and names the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..backends.retry import describe
from ..ops.metrics import Metrics

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0
GRACEFUL_TIMEOUT = 3.0

Check = Callable[[], Awaitable[str | None]]
"""A readiness check: raises when its part is down (/readyz 503); returns a reason when its
part works but is degraded (/readyz still 200, the reason under "degraded"); None when well."""


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
    checks: Mapping[str, Check], metrics: Metrics, stats: Callable[[], Awaitable[dict[str, Any]]]
) -> Starlette:
    """The ASGI application; checks name what /readyz requires, stats() feeds /stats."""

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

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_page),
            Route("/stats", stats_page),
        ]
    )


def bounded_config() -> HypercornConfig:
    """hypercorn's settings for a port that only operators and scrapers use: every request is
    a small GET, so headers, bodies, streams and waits are kept short."""
    config = HypercornConfig()
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
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve app on host:port until shutdown is set; in-flight requests get GRACEFUL_TIMEOUT."""
    config = bounded_config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]
    logger.info("HTTP: stopped")
