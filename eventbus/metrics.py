"""Prometheus metrics of one daemon, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, disable_created_metrics

from . import __version__

disable_created_metrics()  # type: ignore[no-untyped-call] # the *_created series only double what /metrics already says


class Metrics:
    """The daemon's counters and gauges; /metrics renders the registry, /stats reads the values."""

    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry()
        info = Info(
            "eventbus_build", "Version and node name of this daemon", registry=self.registry
        )
        info.info({"version": __version__, "node": node})
        self.dependency_up = Gauge(
            "eventbus_dependency_up",
            "1 while the dependency answers, else 0",
            ["dependency"],
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "eventbus_grpc_requests",
            "gRPC calls finished, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_in_flight = Gauge(
            "eventbus_grpc_in_flight", "gRPC calls being handled now", registry=self.registry
        )
        self.stray_asyncio_errors = Counter(
            "eventbus_stray_asyncio_errors",
            "Errors that reached the asyncio loop's exception handler (logged, not fatal)",
            registry=self.registry,
        )
        self.reconnects = Counter(
            "eventbus_reconnects",
            "Connections re-established after a loss, by dependency",
            ["dependency"],
            registry=self.registry,
        )
