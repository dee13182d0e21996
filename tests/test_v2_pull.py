"""eventbus.v2.Subscriber/Pull through real daemons: batches up to max_messages, waiting for the
first, topic groups, bytes and attributes; its ack ids settled by the unary calls on any node,
with a delay, to the dead letters, with a new deadline; stale ids; refused requests."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from eventbus._generated import v2_pb2
from tests.servers import unique_name
from tests.v2_client import V2Client, message
from tests.v2_support import dead_letters_of, quick

ALL_BYTES = bytes(range(256))
DEAD_ON_REQUEST = "nacked to dead letters by the subscriber"
# A Pull's delivery not acked within 1 s comes back at the next republish tick (0.2 s).
SHORT_DEADLINE = quick(delivery={"ack_deadline_seconds": 1})


def pull(
    v2: V2Client, queue: str, most: int = 1, wait: float = 5, **fields: Any
) -> list[v2_pb2.ReceivedMessage]:
    request = v2_pb2.PullRequest(queue=queue, max_messages=most, wait_seconds=wait, **fields)
    reply = v2._unary(
        "/eventbus.v2.Subscriber/Pull", request, v2_pb2.PullResponse, timeout=wait + 10
    )
    return list(reply.messages)


def pull_all(v2: V2Client, queue: str, count: int, **fields: Any) -> list[v2_pb2.ReceivedMessage]:
    """count messages from as many Pulls as it takes (each waiting up to 5 s)."""
    got: list[v2_pb2.ReceivedMessage] = []
    while len(got) < count:
        more = pull(v2, queue, count - len(got), **fields)
        assert more, f"{len(got)} of {count} messages"
        got += more
    return got


@pytest.fixture
def node(make_daemon: Any) -> Any:
    started = make_daemon(**SHORT_DEADLINE)
    started.wait_ready()
    return started


@pytest.fixture
def v2(node: Any) -> Iterator[V2Client]:
    client = V2Client(node.grpc_address)
    yield client
    client.close()


def test_pull_hands_out_up_to_max_messages_with_their_fields(v2: V2Client) -> None:
    queue = unique_name("pull")
    assert pull(v2, queue, wait=0) == []  # nothing there: answers at once
    results = v2.publish(
        message(queue, ALL_BYTES, attributes={"k": "✓"}),
        *[message(queue, f"m{i}".encode()) for i in range(1, 5)],
    )
    got = pull_all(v2, queue, 3)
    assert len(got) == 3
    got += pull_all(v2, queue, 2)
    assert [m.message_id for m in got] == [r.message_id for r in results]
    assert got[0].data == ALL_BYTES and dict(got[0].attributes) == {"k": "✓"}
    assert len({m.ack_id for m in got}) == 5
    for m in got:
        assert (m.attempt, m.queue) == (1, queue)
        span = m.deadline.ToMicroseconds() - m.publish_time.ToMicroseconds()
        assert 0.5e6 <= span <= 3e6  # delivery.ack_deadline_seconds = 1
    assert v2.acknowledge([m.ack_id for m in got]) == []
    assert pull(v2, queue, 10, wait=2.0) == []  # acked: none came back past the deadline


def test_pull_waits_for_the_first_message(v2: V2Client) -> None:
    queue = unique_name("pull-wait")
    started = time.monotonic()
    assert pull(v2, queue, wait=1.0) == []
    assert time.monotonic() - started >= 0.9
    v2.publish(message(queue, b"late"))
    (got,) = pull(v2, queue, wait=5)
    assert got.data == b"late"
    assert v2.acknowledge([got.ack_id]) == []


def test_pull_on_a_topic_group(v2: V2Client) -> None:
    topic, group = unique_name("t"), unique_name("g")
    assert pull(v2, group, topic=topic, wait=0.2) == []  # the first pull binds the group
    v2.publish(v2_pb2.OutboundMessage(topic=topic, data=b"to the group"))
    (got,) = pull(v2, group, topic=topic)
    assert (got.data, got.queue) == (b"to the group", group)
    assert v2.acknowledge([got.ack_id]) == []


def test_an_unacked_pull_comes_back_and_a_pull_ack_works_on_another_node(
    make_daemon: Any, v2: V2Client
) -> None:
    other_node = make_daemon(**SHORT_DEADLINE)
    other_node.wait_ready()
    other = V2Client(other_node.grpc_address)
    queue = unique_name("pull-nodes")
    v2.publish(message(queue, b"acked elsewhere"), message(queue, b"left"))
    by = {m.data: m for m in pull_all(v2, queue, 2)}
    assert other.acknowledge([by[b"acked elsewhere"].ack_id]) == []
    (again,) = pull(other, queue, wait=5)
    assert (again.data, again.attempt) == (b"left", 2)
    assert again.message_id == by[b"left"].message_id
    assert v2.acknowledge([again.ack_id]) == []
    assert pull(v2, queue, wait=2.0) == []
    other.close()


def test_a_unary_nack_of_a_pull_can_dead_letter_it(v2: V2Client, backends: Any) -> None:
    queue = unique_name("pull-dead")
    (result,) = v2.publish(message(queue, b"doomed"))
    (held,) = pull(v2, queue)
    assert v2.nack([held.ack_id], dead_letter=True) == []
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert (letter["message_id"], letter["reason"]) == (result.message_id, DEAD_ON_REQUEST)
    assert pull(v2, queue, wait=1.0) == []


def test_a_unary_nack_of_a_pull_with_a_delay_comes_back_no_earlier(v2: V2Client) -> None:
    queue = unique_name("pull-delay")
    v2.publish(message(queue, b"later"))
    (held,) = pull(v2, queue)
    nacked_at = time.monotonic()
    assert v2.nack([held.ack_id], delay=3) == []
    (again,) = pull(v2, queue, wait=6)
    assert time.monotonic() - nacked_at >= 3.0
    assert (again.message_id, again.attempt) == (held.message_id, 2)


def test_modify_ack_deadline_extends_a_pull(v2: V2Client) -> None:
    queue = unique_name("pull-extend")
    v2.publish(message(queue, b"slow"))
    (held,) = pull(v2, queue)
    assert v2.modify([held.ack_id], 30) == []
    assert pull(v2, queue, wait=2.0) == []  # held past its 1 s deadline
    assert v2.acknowledge([held.ack_id]) == []


def test_a_pull_of_large_messages_fits_a_client_with_the_default_receive_limit(
    v2: V2Client,
) -> None:
    queue = unique_name("pull-large")
    for batch in range(3):  # 60 messages of 150 KiB, 9 MiB in all
        v2.publish(*[message(queue, bytes([batch * 20 + i]) * 150 * 1024) for i in range(20)])
    got = pull(v2, queue)  # starts the node's consumer, which buffers the rest
    time.sleep(1)
    while len(got) < 60:
        more = pull(v2, queue, 100, wait=2)
        assert more
        got += more
    assert sorted(m.data[0] for m in got) == list(range(60))


def test_refused_pulls_are_invalid_argument(v2: V2Client) -> None:
    queue = unique_name("pull-bad")
    for fields, named in [
        ({"queue": ""}, "queue"),
        ({"queue": "amq.x"}, "queue"),
        ({"queue": queue, "topic": "amq.t"}, "topic"),
        ({"queue": queue, "max_messages": 1001}, "max_messages"),
        ({"queue": queue, "wait_seconds": 301}, "wait_seconds"),
        ({"queue": queue, "wait_seconds": -1}, "wait_seconds"),
        ({"queue": queue, "wait_seconds": math.nan}, "wait_seconds"),
        ({"queue": queue, "wait_seconds": math.inf}, "wait_seconds"),
    ]:
        request = v2_pb2.PullRequest(**fields)
        with pytest.raises(grpc.RpcError) as caught:
            v2._unary("/eventbus.v2.Subscriber/Pull", request, v2_pb2.PullResponse, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert named in (caught.value.details() or ""), fields
