"""Queue declarations through a real daemon: publishing to thousands of distinct queues keeps the
daemon serving on a bounded number of channels; server.auto_create_queues false answers
NOT_FOUND for a queue that does not exist."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from tests.bus_client import BusClient, status_of
from tests.servers import connections, unique_name


def channels_of_daemon(vhost: str) -> int:
    """Channels of the daemon's connections to vhost (named "eventbus ..."), as RabbitMQ
    counts."""
    rows = connections(vhost, "client_properties", "channels")
    return sum(int(channels) for properties, channels in rows if '"eventbus ' in properties)


@pytest.mark.own_vhost
def test_thousands_of_queues_keep_the_channel_count_bounded(
    make_daemon: Any, backends: Any
) -> None:
    daemon = make_daemon(amqp={"publish_channels": 4, "producers_per_queue": 2})
    daemon.wait_ready()
    queues = [unique_name("wide") for _ in range(2100)]  # 2 per queue was past channel_max
    clients = [BusClient(daemon.grpc_address) for _ in range(8)]

    def publish(i: int) -> None:
        clients[i % len(clients)].publish(queues[i], f"m{i}", timeout=30)

    with ThreadPoolExecutor(len(clients)) as pool:
        list(pool.map(publish, range(len(queues))))
    vhost = backends.amqp_url.rsplit("/", 1)[1]
    assert channels_of_daemon(vhost) <= 40  # pool, declarations, consumers, bookkeeping
    assert daemon.http_get("/readyz")[0] == 200
    assert clients[0].subscribe(queues[-1], timeout=10).data == f"m{len(queues) - 1}"


def test_without_auto_create_a_missing_queue_is_not_found(make_daemon: Any) -> None:
    daemon = make_daemon(server={"auto_create_queues": False})
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    queue = unique_name("absent")
    for call in (
        lambda: client.publish(queue, "x"),
        lambda: client.delay_publish(queue, "x", delay=5),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.NOT_FOUND and queue in details
        assert "auto_create_queues" in details
