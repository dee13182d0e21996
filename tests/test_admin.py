"""eventbus.v2.Admin against a real daemon: queue counts, dead letters, delayed messages, purge,
refusals; and the same answers from the command line for the same state."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any, TypeVar

import grpc
import pytest

from eventbus._generated import v2_pb2
from eventbus.errors import InvalidArgument
from eventbus.jobs import admin
from tests.bus_client import BusClient
from tests.conftest import Backends
from tests.test_daemon import grpclib_health_and_services

T = TypeVar("T")

FAST = {
    "delivery": {"ack_deadline_seconds": 30, "nack_redelivery_delay_seconds": 0, "max_retries": 0},
    "cron": {"interval_seconds": 0.2},
}


class AdminClient:
    """Calls of eventbus.v2.Admin by name, over grpcio."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)

    def call(self, method: str, request: Any, timeout: float = 10) -> Any:
        reply_type = {
            "GetQueue": v2_pb2.QueueInfo,
            "ListQueues": v2_pb2.ListQueuesResponse,
            "ListDeadLetters": v2_pb2.ListDeadLettersResponse,
            "RequeueDeadLetters": v2_pb2.RequeueDeadLettersResponse,
            "ListDelayed": v2_pb2.ListDelayedResponse,
            "CancelDelayed": v2_pb2.CancelDelayedResponse,
            "PurgeQueue": v2_pb2.PurgeQueueResponse,
        }[method]
        unary = self.channel.unary_unary(
            f"/eventbus.v2.Admin/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=reply_type.FromString,
        )
        return unary(request, timeout=timeout)

    def queue(self, name: str) -> v2_pb2.QueueInfo:
        return self.call("GetQueue", v2_pb2.GetQueueRequest(queue=name))

    def refusal(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        try:
            self.call(method, request)
        except grpc.RpcError as error:
            return error.code(), error.details()
        raise AssertionError(f"{method} succeeded")


@pytest.fixture
def bus(make_daemon: Any) -> Iterator[tuple[Any, BusClient, AdminClient]]:
    daemon = make_daemon(**FAST)
    daemon.wait_ready()
    client, admin_client = BusClient(daemon.grpc_address), AdminClient(daemon.grpc_address)
    yield daemon, client, admin_client
    client.close()
    admin_client.channel.close()


def eventually(probe: Callable[[], T], wanted: Callable[[T], bool], timeout: float = 10) -> T:
    """probe() once wanted(probe()) holds; fails with the last value after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not wanted(value := probe()):
        assert time.monotonic() < deadline, f"still {value}"
        time.sleep(0.1)
    return value


def cli(daemon: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eventbus", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli_json(daemon: Any, *args: str) -> list[dict[str, Any]]:
    result = cli(daemon, *args, "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def counts(info: v2_pb2.QueueInfo) -> tuple[int, int, int, int, int]:
    return info.ready, info.in_flight, info.delayed, info.dead_letters, info.consumers


def test_queue_counts_follow_publishing_pulling_delaying_and_acking(
    bus: tuple[Any, BusClient, AdminClient],
) -> None:
    _, client, admin_client = bus
    for data in ("one", "two", "three"):
        client.publish("work", data)
    assert admin_client.queue("work") == v2_pb2.QueueInfo(name="work", ready=3)

    client.delay_publish("work", "later", delay=60)
    eventually(lambda: admin_client.queue("work").delayed, lambda n: n == 1)
    first = client.subscribe("work")
    # One handed out; this node holds the other two prefetched, and consumes the queue.
    info = eventually(
        lambda: admin_client.queue("work"), lambda i: (i.in_flight, i.ready) == (1, 2)
    )
    assert (info.delayed, info.dead_letters) == (1, 0) and info.consumers >= 1

    [listed] = [q for q in admin_client.call("ListQueues", v2_pb2.ListQueuesRequest()).queues]
    assert listed == admin_client.queue("work")
    client.ack(first.id)
    assert eventually(lambda: admin_client.queue("work").in_flight, lambda n: n == 0) == 0


def test_dead_letters_listed_and_requeued_alike_by_the_cli_and_the_api(
    bus: tuple[Any, BusClient, AdminClient],
) -> None:
    daemon, client, admin_client = bus
    for queue, data in (("fragile-a", "a1"), ("fragile-a", "a2"), ("fragile-b", "b1")):
        client.publish(queue, data)
        client.nack(client.subscribe(queue).id)  # max_retries = 0: dead at the next tick

    def letters(**fields: Any) -> list[v2_pb2.DeadLetter]:
        request = v2_pb2.ListDeadLettersRequest(**fields)
        return list(admin_client.call("ListDeadLetters", request).dead_letters)

    api = eventually(letters, lambda found: len(found) == 3)
    from_cli = cli_json(daemon, "dead-letters", "list")
    assert [_letter_fields(d) for d in api] == [
        {key: row[key] for key in ("message_id", "queue", "attempts", "dead_at", "data")}
        for row in from_cli
    ]
    assert sorted(d.data for d in letters(queue="fragile-a")) == [b"a1", b"a2"]  # one tick
    assert [d.data for d in letters(limit=1, offset=1)] == [api[1].data]
    assert admin_client.queue("fragile-a").dead_letters == 2

    def requeue(**fields: Any) -> int:
        request = v2_pb2.RequeueDeadLettersRequest(**fields)
        return int(admin_client.call("RequeueDeadLetters", request).requeued)

    a1 = next(d for d in api if d.data == b"a1")
    assert requeue(message_ids=[str(uuid.uuid4())]) == 0
    assert requeue(message_ids=[a1.message_id.upper()]) == 1
    assert requeue(queue="fragile-a") == 1
    assert requeue() == 1  # every queue
    assert letters() == [] and cli(daemon, "dead-letters", "list").stdout == ""
    back = sorted(client.subscribe(q).data for q in ("fragile-a", "fragile-a", "fragile-b"))
    assert back == ["a1", "a2", "b1"]


def _letter_fields(letter: v2_pb2.DeadLetter) -> dict[str, Any]:
    return {
        "message_id": letter.message_id,
        "queue": letter.queue,
        "attempts": letter.attempts,
        "dead_at": letter.dead_time.ToDatetime(tzinfo=UTC).isoformat(),
        "data": letter.data.decode(),
    }


def test_delayed_listed_and_cancelled_alike_by_the_cli_and_the_api(
    bus: tuple[Any, BusClient, AdminClient],
) -> None:
    daemon, client, admin_client = bus
    for data in ("d1", "d2", "d3"):
        client.delay_publish("later", data, delay=60)
    client.topic_delay_publish("news", "t1", delay=60)

    def delayed(**fields: Any) -> list[v2_pb2.DelayedMessage]:
        request = v2_pb2.ListDelayedRequest(**fields)
        return list(admin_client.call("ListDelayed", request).delayed)

    everything = eventually(delayed, lambda found: len(found) == 4)
    api = delayed(queue="later")
    from_cli = cli_json(daemon, "delayed", "list", "--queue", "later")
    assert [(m.message_id, m.data.decode()) for m in api] == [
        (row["id"], row["data"]) for row in from_cli
    ]
    assert [m.message_id for m in delayed(queue="later", limit=2, offset=1)] == [
        m.message_id for m in api[1:]
    ]
    [topical] = delayed(topic="news")
    assert (topical.topic, topical.queue, topical.data) == ("news", "", b"t1")
    assert {m.message_id for m in everything} == {m.message_id for m in [*api, topical]}

    unknown = str(uuid.uuid4())
    request = v2_pb2.CancelDelayedRequest(
        message_ids=[api[0].message_id, unknown, topical.message_id]
    )
    reply = admin_client.call("CancelDelayed", request)
    assert (reply.cancelled, list(reply.not_found)) == (2, [unknown])
    assert cli(daemon, "delayed", "cancel", api[0].message_id).returncode == 1  # gone already
    assert cli(daemon, "delayed", "cancel", api[1].message_id).returncode == 0
    assert [m.message_id for m in delayed()] == [api[2].message_id]
    assert cli_json(daemon, "delayed", "list")[0]["id"] == api[2].message_id
    assert admin_client.queue("later").delayed == 1


def test_purge_and_refusals(bus: tuple[Any, BusClient, AdminClient], backends: Backends) -> None:
    _, client, admin_client = bus
    for n in range(5):
        client.publish("flush", f"m{n}")
    reply = admin_client.call("PurgeQueue", v2_pb2.PurgeQueueRequest(queue="flush"))
    assert reply.purged == 5
    assert counts(admin_client.queue("flush")) == (0, 0, 0, 0, 0)
    assert client.try_subscribe("flush", timeout=1) is None

    invalid, not_found = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    internal = f"{backends.namespace}.delay"
    refusals = [
        ("PurgeQueue", v2_pb2.PurgeQueueRequest(queue=internal), invalid, "namespace"),
        ("PurgeQueue", v2_pb2.PurgeQueueRequest(queue="amq.direct"), invalid, "amq."),
        ("PurgeQueue", v2_pb2.PurgeQueueRequest(queue="no-such-queue"), not_found, "no-such"),
        ("GetQueue", v2_pb2.GetQueueRequest(queue=""), invalid, "queue must not be empty"),
        ("GetQueue", v2_pb2.GetQueueRequest(queue=internal), invalid, "namespace"),
        ("GetQueue", v2_pb2.GetQueueRequest(queue="no-such-queue"), not_found, "no-such-queue"),
        ("ListDeadLetters", v2_pb2.ListDeadLettersRequest(limit=1001), invalid, "limit"),
        ("ListDelayed", v2_pb2.ListDelayedRequest(limit=5000), invalid, "limit"),
        ("ListDelayed", v2_pb2.ListDelayedRequest(queue="q", topic="t"), invalid, "not both"),
        ("CancelDelayed", v2_pb2.CancelDelayedRequest(), invalid, "must not be empty"),
        (
            "CancelDelayed",
            v2_pb2.CancelDelayedRequest(message_ids=[str(uuid.uuid4()), "nope"]),
            invalid,
            "message_ids[1]",
        ),
        (
            "RequeueDeadLetters",
            v2_pb2.RequeueDeadLettersRequest(message_ids=[str(uuid.uuid4())] * 1001),
            invalid,
            "at most 1000",
        ),
    ]
    for method, request, code, words in refusals:
        status, details = admin_client.refusal(method, request)
        assert status == code and words in details, (method, status, details)
    # Looking never creates a queue.
    assert admin_client.refusal("GetQueue", v2_pb2.GetQueueRequest(queue="no-such-queue"))[0] == (
        not_found
    )
    assert admin_client.call("ListDeadLetters", v2_pb2.ListDeadLettersRequest()).dead_letters == []


def test_reflection_lists_the_admin_service(bus: tuple[Any, BusClient, AdminClient]) -> None:
    daemon, _, _ = bus
    _, services = asyncio.run(grpclib_health_and_services(daemon.grpc_port))
    assert "eventbus.v2.Admin" in services


def test_page_sizes_and_message_ids() -> None:
    assert (admin.page_size(0), admin.page_size(1), admin.page_size(1000)) == (100, 1, 1000)
    with pytest.raises(InvalidArgument, match="limit must be 0-1000"):
        admin.page_size(1001)
    same = "0b8e3b5c-2c52-4f8e-9d2f-6a1d4a2b9c10"
    assert admin.message_ids([same.upper(), same]) == [same]
    with pytest.raises(InvalidArgument, match=r"message_ids\[0\]"):
        admin.message_ids(["{" + same + "}"])
    assert admin.delayed_target("", "news", "ns") == ("topic", "news")
    assert admin.delayed_target(None, None, "ns") is None
    with pytest.raises(InvalidArgument, match="namespace"):
        admin.delayed_target("ns.delay", "", "ns")


def test_the_cli_deletes_dead_letters_of_a_queue_or_by_id_never_all_at_once(
    bus: tuple[Any, BusClient, AdminClient],
) -> None:
    daemon, client, admin_client = bus
    for queue, data in (("doomed-a", "a1"), ("doomed-a", "a2"), ("doomed-b", "b1")):
        client.publish(queue, data)
        client.nack(client.subscribe(queue).id)  # max_retries = 0: dead at the next tick
    eventually(lambda: admin_client.queue("doomed-b").dead_letters, lambda n: n == 1)
    eventually(lambda: admin_client.queue("doomed-a").dead_letters, lambda n: n == 2)

    refused = cli(daemon, "dead-letters", "delete")
    assert refused.returncode == 2 and "name --queue or --message-id" in refused.stderr
    listed = cli_json(daemon, "dead-letters", "list", "--queue", "doomed-a")
    [a1] = [row for row in listed if row["data"] == "a1"]
    assert (
        "deleted 1 dead letters"
        in cli(daemon, "dead-letters", "delete", "--message-id", a1["message_id"]).stderr
    )
    assert admin_client.queue("doomed-a").dead_letters == 1
    assert (
        "deleted 1 dead letters"
        in cli(daemon, "dead-letters", "delete", "--queue", "doomed-a").stderr
    )
    assert admin_client.queue("doomed-a").dead_letters == 0
    assert [
        row["data"] for row in cli_json(daemon, "dead-letters", "list", "--queue", "doomed-b")
    ] == ["b1"]


def test_list_queues_names_a_queue_only_published_to(
    bus: tuple[Any, BusClient, AdminClient],
) -> None:
    _, client, admin_client = bus
    client.publish("published-only", "one")
    listed = admin_client.call("ListQueues", v2_pb2.ListQueuesRequest()).queues
    [info] = [q for q in listed if q.name == "published-only"]
    assert (info.ready, info.in_flight, info.consumers) == (1, 0, 0)
    assert "(other queues)" not in {q.name for q in listed}  # a metrics label, not a queue
