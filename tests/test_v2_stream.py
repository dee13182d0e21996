"""The v2 API through a real daemon: batch publish and StreamingPull."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from eventbus._generated import v2_pb2
from tests.servers import unique_name
from tests.v2_client import V2Client, message


@pytest.fixture
def v2(make_daemon: Any) -> Any:
    daemon = make_daemon(delivery={"nack_redelivery_delay_seconds": 0})
    daemon.wait_ready()
    client = V2Client(daemon.grpc_address)
    yield client
    client.close()


def test_a_batch_is_delivered_on_a_stream_and_acked(v2: V2Client) -> None:
    queue = unique_name("v2")
    results = v2.publish(
        *[message(queue, f"m{i}".encode(), attributes={"n": str(i)}) for i in range(10)]
    )
    assert len({r.message_id for r in results}) == 10
    stream = v2.stream(queue, max_outstanding_messages=100)
    got = stream.receive(10)
    assert [m.data for m in got] == [f"m{i}".encode() for i in range(10)]
    assert [m.attributes["n"] for m in got] == [str(i) for i in range(10)]
    assert [m.message_id for m in got] == [r.message_id for r in results]
    assert all(m.attempt == 1 and m.publish_time.seconds > 0 for m in got)
    stream.send(ack_ids=[m.ack_id for m in got])
    time.sleep(0.5)
    stream.close()
    again = v2.stream(queue)
    assert again.quiet_for(1.0) == []
    again.cancel()


def test_a_broken_stream_hands_its_messages_back_at_once(v2: V2Client) -> None:
    queue = unique_name("v2")
    v2.publish(*[message(queue, b"x") for _ in range(5)])
    first = v2.stream(queue, ack_deadline_seconds=600)
    held = first.receive(5)
    first.cancel()
    second = v2.stream(queue)
    started = time.monotonic()
    back = second.receive(5)
    assert time.monotonic() - started < 3
    assert sorted(m.message_id for m in back) == sorted(m.message_id for m in held)
    assert v2.acknowledge([m.ack_id for m in held]) == [m.ack_id for m in held]
    second.cancel()


def test_a_nack_brings_the_next_attempt(v2: V2Client) -> None:
    queue = unique_name("v2")
    v2.publish(message(queue, b"again"))
    stream = v2.stream(queue)
    (first,) = stream.receive(1)
    stream.send(nack_ids=[first.ack_id])
    (second,) = stream.receive(1)
    assert second.message_id == first.message_id
    assert second.attempt == 2
    stream.send(ack_ids=[first.ack_id])
    assert first.ack_id in stream.next_response().invalid_ack_ids
    stream.cancel()


def test_an_invalid_batch_stores_nothing(v2: V2Client) -> None:
    queue = unique_name("v2")
    with pytest.raises(grpc.RpcError) as caught:
        v2.publish(message(queue), message(queue), message("amq.bad"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[2].queue" in caught.value.details()
    stream = v2.stream(queue)
    assert stream.quiet_for(1.0) == []
    stream.cancel()


def test_a_stopping_daemon_ends_its_streams_and_hands_their_messages_back(
    make_daemon: Any,
) -> None:
    first, second = make_daemon(), make_daemon()
    first.wait_ready()
    second.wait_ready()
    queue = unique_name("v2")
    client = V2Client(first.grpc_address)
    client.publish(*[message(queue, b"x") for _ in range(3)])
    stream = client.stream(queue)
    held = stream.receive(3)
    started = time.monotonic()
    assert first.stop() == 0
    assert time.monotonic() - started < 4  # not the whole shutdown grace
    other = V2Client(second.grpc_address).stream(queue)
    back = other.receive(3)
    assert sorted(m.message_id for m in back) == sorted(m.message_id for m in held)
    other.cancel()


def test_pull_hands_out_recorded_deliveries_that_ack_on_any_node(v2: V2Client) -> None:
    queue = unique_name("v2")
    v2.publish(*[message(queue, bytes([i, 255])) for i in range(5)])
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        got += v2.pull(queue, max_messages=5, wait_seconds=2)
    assert sorted(m.data for m in got) == sorted(bytes([i, 255]) for i in range(5))
    assert all(m.attempt == 1 and m.deadline.seconds > time.time() for m in got)
    assert v2.acknowledge([m.ack_id for m in got]) == []
    assert v2.pull(queue, max_messages=5, wait_seconds=0.5) == []


def test_a_message_nacked_to_dead_letters_comes_back_whole_when_requeued(v2: V2Client) -> None:
    queue = unique_name("v2")
    (result,) = v2.publish(message(queue, b"\x00\xff", attributes={"k": "v"}))
    stream = v2.stream(queue)
    (held,) = stream.receive(1)
    assert v2.nack([held.ack_id], dead_letter=True) == []
    admin = AdminClient(v2)
    deadline = time.monotonic() + 10
    while not (letters := admin.dead_letters(queue)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [(d.message_id, d.data, d.reason) for d in letters] == [
        (result.message_id, b"\x00\xff", "nacked to dead letters by the subscriber")
    ]
    assert admin.requeue(queue) == 1
    (back,) = stream.receive(1)
    assert (back.message_id, back.data, dict(back.attributes)) == (
        result.message_id,
        b"\x00\xff",
        {"k": "v"},
    )
    assert back.publish_time == held.publish_time
    stream.cancel()


class AdminClient:
    def __init__(self, client: V2Client) -> None:
        self._client = client

    def dead_letters(self, queue: str) -> list[v2_pb2.DeadLetter]:
        request = v2_pb2.ListDeadLettersRequest(queue=queue)
        reply = self._client._unary(
            "/eventbus.v2.Admin/ListDeadLetters", request, v2_pb2.ListDeadLettersResponse
        )
        return list(reply.dead_letters)

    def requeue(self, queue: str) -> int:
        request = v2_pb2.RequeueDeadLettersRequest(queue=queue)
        reply = self._client._unary(
            "/eventbus.v2.Admin/RequeueDeadLetters", request, v2_pb2.RequeueDeadLettersResponse
        )
        return int(reply.requeued)


def test_streams_past_the_node_limit_are_refused(make_daemon: Any) -> None:
    daemon = make_daemon(server={"max_streaming_pulls": 1})
    daemon.wait_ready()
    client = V2Client(daemon.grpc_address)
    queue = unique_name("v2")
    first = client.stream(queue)
    client.publish(message(queue))
    first.receive(1)  # the first stream is open and serving
    second = client.stream(queue)
    with pytest.raises(grpc.RpcError) as caught:
        second.next_response()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server.max_streaming_pulls" in caught.value.details()
    first.cancel()


def test_ack_ids_longer_than_any_the_bus_hands_out_are_refused(v2: V2Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        v2.acknowledge(["x" * 65])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = v2.stream(unique_name("v2"))
    stream.send(ack_ids=["y" * 1_000_000])
    with pytest.raises(grpc.RpcError) as caught:
        stream.next_response()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64 characters" in caught.value.details()


def test_streams_cancelled_at_any_moment_leave_the_node_connected(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    client = V2Client(daemon.grpc_address)
    queue = unique_name("v2")
    client.publish(*[message(queue, b"x") for _ in range(50)])
    for n in range(40):
        stream = client.stream(queue, max_outstanding_messages=5)
        if n % 2:
            stream.receive(1)
        else:
            time.sleep(0.005 * (n % 7))  # cancelled while opening, or just after
        stream.cancel()
    last = client.stream(queue, max_outstanding_messages=100)
    assert len(last.receive(50, timeout=15)) >= 50  # every message is back, none held away
    last.cancel()
    assert "connection lost" not in daemon.log
    assert "RabbitMQ: reconnected" not in daemon.log
