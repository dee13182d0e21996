"""Fault tests on a real cluster (scripts/cluster.py): skipped unless asked for, with
`pytest tests/cluster --cluster` (what `make test-cluster` runs) or EVENTBUS_CLUSTER_TESTS=1.

They start RabbitMQ and PostgreSQL servers of their own beside the machine's (as root), take
minutes, and print the checker's table of every run, at once (with -s) and again at the end.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.cluster import report

if TYPE_CHECKING:
    from scripts.cluster import Cluster

ENV = "EVENTBUS_CLUSTER_TESTS"
HERE = Path(__file__).resolve().parent

# What the daemons of a fault test need beyond the cluster's own configuration: a v1 delivery
# whose answer or ack went down with a killed daemon comes back within the run (not after the
# default 30 minutes), and a broker outage longer than a fault step never ends a daemon.
DAEMON_OVERRIDES: dict[str, dict[str, Any]] = {
    "delivery": {"ack_deadline_seconds": 8},
    "cron": {"interval_seconds": 1.0},
    "amqp": {"reconnect_window_seconds": 120},
    "log": {"level": "info"},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", action="store_true", help="run the fault tests of tests/cluster")


def enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("--cluster", default=False)) or os.environ.get(ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if enabled(config):
        return
    skip = pytest.mark.skip(reason=f"cluster fault tests: run with --cluster or {ENV}=1")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if report.TABLES:
        terminalreporter.section("cluster fault tests: checker tables")
        for table in report.TABLES:
            terminalreporter.write_line(table)


def start_cluster(queue_type: str, daemons: int = 3) -> Iterator[Cluster]:
    """A cluster of queue_type queues under a fresh directory of /tmp; stopped after."""
    from scripts.cluster import Cluster

    base = Path("/tmp") / f"eventbus-cluster-test-{uuid.uuid4().hex[:8]}"
    cluster = Cluster(base, daemons=daemons, queue_type=queue_type, overrides=DAEMON_OVERRIDES)
    cluster.start()
    try:
        yield cluster
    finally:
        keep_logs(cluster)
        cluster.stop()


def keep_logs(cluster: Cluster) -> None:
    """With EVENTBUS_CLUSTER_LOGS=DIR, copy the daemons' logs there before the cluster (and
    its directory) goes."""
    target = os.environ.get("EVENTBUS_CLUSTER_LOGS")
    if not target:
        return
    directory = Path(target) / cluster.base.name
    directory.mkdir(parents=True, exist_ok=True)
    for index, daemon in enumerate(cluster.daemons, 1):
        if daemon.log.exists():
            shutil.copy(daemon.log, directory / f"daemon{index}.log")


@pytest.fixture(scope="module")
def quorum_cluster() -> Iterator[Cluster]:
    yield from start_cluster("quorum")


@pytest.fixture(scope="module")
def classic_cluster() -> Iterator[Cluster]:
    yield from start_cluster("classic")
