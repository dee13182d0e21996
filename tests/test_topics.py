"""mq.MqTopic against a real daemon: fan-out, late binding, per-queue retries, TTL, bad input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.bus_client import BusClient, status_of

FAST = {
    "delivery": {"ack_deadline_seconds": 30, "nack_redelivery_delay_seconds": 1},
    "cron": {"interval_seconds": 0.2},
}


@pytest.fixture
def client(make_daemon: Any) -> Iterator[BusClient]:
    daemon = make_daemon(**FAST)
    daemon.wait_ready()
    bus = BusClient(daemon.grpc_address)
    yield bus
    bus.close()


def bind(client: BusClient, topic: str, *queues: str) -> None:
    """The first pull of a queue binds it to the topic."""
    for queue in queues:
        assert client.try_topic_subscribe(topic, queue, timeout=0.5) is None


def drain(client: BusClient, topic: str, queue: str, wait: float = 1.0) -> list[Any]:
    got = []
    while (reply := client.try_topic_subscribe(topic, queue, timeout=wait)) is not None:
        client.topic_ack(reply.id)
        got.append(reply)
    return got


@pytest.mark.parametrize("queues", [("fan-a", "fan-b"), ("fan-x", "fan-y", "fan-z")])
def test_every_bound_queue_gets_every_message(client: BusClient, queues: tuple[str, ...]) -> None:
    bind(client, "orders", *queues)
    sent = [f"order {i}" for i in range(5)]
    for data in sent:
        client.topic_publish("orders", data)
    replies = {queue: drain(client, "orders", queue) for queue in queues}
    for queue, got in replies.items():
        assert [r.data for r in got] == sent
        assert {r.queue for r in got} == {queue}
    all_ids = [r.id for got in replies.values() for r in got]
    assert len(set(all_ids)) == len(sent) * len(queues)  # an id per queue's delivery


def test_a_queue_bound_later_gets_only_later_messages(client: BusClient) -> None:
    bind(client, "events", "early")
    client.topic_publish("events", "first")
    bind(client, "events", "late")
    client.topic_publish("events", "second")
    assert [r.data for r in drain(client, "events", "early")] == ["first", "second"]
    assert [r.data for r in drain(client, "events", "late")] == ["second"]


def test_a_retry_goes_only_to_the_queue_that_failed_it(client: BusClient) -> None:
    bind(client, "jobs", "happy", "grumpy")
    client.topic_publish("jobs", "job")
    happy = client.topic_subscribe("jobs", "happy")
    grumpy = client.topic_subscribe("jobs", "grumpy")
    client.topic_ack(happy.id)
    client.topic_nack(grumpy.id)  # must not touch happy's delivery
    again = client.topic_subscribe("jobs", "grumpy", timeout=10)
    assert (again.data, again.queue) == ("job", "grumpy") and again.id != grumpy.id
    client.topic_ack(again.id)
    assert client.try_topic_subscribe("jobs", "happy", timeout=3) is None


def test_a_delayed_topic_message_reaches_every_bound_queue(client: BusClient) -> None:
    bind(client, "later", "l1", "l2")
    started = time.monotonic()
    client.topic_delay_publish("later", "tick", delay=1)
    for queue in ("l1", "l2"):
        reply = client.topic_subscribe("later", queue, timeout=10)
        assert reply.data == "tick"
        client.topic_ack(reply.id)
    assert time.monotonic() - started >= 1.0


def test_ttl_applies_to_topic_messages(client: BusClient) -> None:
    bind(client, "fleeting", "f1", "f2")
    client.topic_publish("fleeting", "gone soon", ttl=1)
    client.topic_publish("fleeting", "stays", ttl=60)
    time.sleep(1.5)
    for queue in ("f1", "f2"):
        assert [r.data for r in drain(client, "fleeting", queue)] == ["stays"]


def test_invalid_topic_input(client: BusClient) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for call, words in [
        (lambda: client.topic_publish("", "x"), "topic must not be empty"),
        (lambda: client.topic_publish("t", ""), "data must not be empty"),
        (lambda: client.topic_publish("amq.topic", "x"), "amq."),
        (lambda: client.topic_subscribe("t", ""), "queueName must not be empty"),
        (lambda: client.topic_subscribe("", "q"), "topic must not be empty"),
        (lambda: client.topic_subscribe("t", "amq.q"), "amq."),
        (lambda: client.topic_delay_publish("t", "x", delay=10**9), "delaySeconds"),
        (lambda: client.topic_ack("bad"), "is not a delivery id"),
    ]:
        code, details = status_of(call)
        assert code == invalid and words in details, details
