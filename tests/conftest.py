from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import servers
from tests.daemon_process import DaemonProcess


@dataclass(frozen=True)
class Backends:
    """Where one test's daemon keeps its state: its own vhost, database and Redis prefix."""

    amqp_url: str
    postgres_dsn: str
    redis_prefix: str
    namespace: str


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    vhost = servers.unique_name("eventbus_test")
    url = servers.create_vhost(vhost)
    yield url
    servers.delete_vhost(vhost)


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    name = servers.unique_name("eventbus_test")
    dsn = servers.create_database(name)
    yield dsn
    servers.drop_database(name)


@pytest.fixture
def backends(
    request: pytest.FixtureRequest, amqp_url: str, postgres_dsn: str
) -> Iterator[Backends]:
    """A test marked own_vhost (it declares thousands of queues) gets a RabbitMQ virtual host
    of its own, deleted right after it, so a later test that restarts RabbitMQ does not wait
    for them to be recovered."""
    prefix = servers.unique_name("eventbus_test") + ":"
    vhost = (
        servers.unique_name("eventbus_test")
        if request.node.get_closest_marker("own_vhost")
        else None
    )
    url = servers.create_vhost(vhost) if vhost else amqp_url
    yield Backends(url, postgres_dsn, prefix, servers.unique_name("ns"))
    servers.delete_redis_keys(prefix)
    if vhost:
        servers.delete_vhost(vhost)


@pytest.fixture
def make_daemon(backends: Backends, tmp_path: Path) -> Iterator[type[DaemonProcess]]:
    """Start daemon processes on free ports against this test's backends; all stopped at the end."""
    started: list[DaemonProcess] = []

    def start(**overrides: object) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / f"node{len(started)}", backends, **overrides)
        started.append(daemon)
        return daemon

    yield start  # type: ignore[misc]
    for daemon in started:
        daemon.kill()
