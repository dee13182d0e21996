"""Publish dedup through real daemons: a dedup_id already stored for the same queue or topic
within delivery.dedup_window_seconds is not stored again, across calls, within a batch, across
nodes and restarts; other queues are independent; past the window the id is stored again."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import grpc

from eventbus._generated import v2_pb2
from tests.servers import unique_name
from tests.v2_client import V2Client, message
from tests.v2_support import QUICK, bound_group, daemon, eventually, quick, receive_exactly, v2

__all__ = ["daemon", "v2"]  # fixtures


def test_the_same_dedup_id_in_separate_calls_is_stored_once(v2: V2Client) -> None:
    queue = unique_name("dedup")
    (first,) = v2.publish(message(queue, b"first", dedup_id="order-17"))
    (again,) = v2.publish(message(queue, b"second", dedup_id="order-17"))
    (other,) = v2.publish(message(queue, b"other", dedup_id="order-18"))
    assert not first.duplicate and not other.duplicate
    assert again.duplicate and again.message_id == first.message_id
    got = receive_exactly(v2.stream(queue), 2, settle=1.0)
    assert [(m.data, m.message_id) for m in got] == [
        (b"first", first.message_id),
        (b"other", other.message_id),
    ]


def test_the_same_dedup_id_twice_in_one_batch_is_stored_once(v2: V2Client) -> None:
    queue = unique_name("dedup")
    results = v2.publish(
        message(queue, b"a", dedup_id="x"),
        message(queue, b"plain"),
        message(queue, b"a again", dedup_id="x"),
        message(queue, b"b", dedup_id="y"),
    )
    assert [r.duplicate for r in results] == [False, False, True, False]
    assert results[2].message_id == results[0].message_id
    assert len({r.message_id for r in results}) == 3
    got = receive_exactly(v2.stream(queue), 3, settle=1.0)
    assert [m.data for m in got] == [b"a", b"plain", b"b"]


def test_a_delayed_message_is_deduplicated_too(v2: V2Client) -> None:
    queue = unique_name("dedup-later")
    (first,) = v2.publish(message(queue, b"later", delay_seconds=1, dedup_id="later"))
    (again,) = v2.publish(message(queue, b"now", dedup_id="later"))
    assert again.duplicate and again.message_id == first.message_id
    stream = v2.stream(queue)
    got = stream.receive(1, timeout=5) + stream.quiet_for(1.0)
    assert [(m.data, m.message_id) for m in got] == [(b"later", first.message_id)]


def test_a_dedup_id_is_scoped_to_its_queue_or_topic(v2: V2Client) -> None:
    one, two = unique_name("dedup1"), unique_name("dedup2")
    topic, group = unique_name("t"), unique_name("g")
    grouped = bound_group(v2, topic, group)
    results = v2.publish(
        message(one, b"1", dedup_id="same"),
        message(two, b"2", dedup_id="same"),
        v2_pb2.OutboundMessage(topic=topic, data=b"t", dedup_id="same"),
        v2_pb2.OutboundMessage(topic=one, data=b"topic named as a queue", dedup_id="same"),
    )
    assert not any(r.duplicate for r in results)
    assert len({r.message_id for r in results}) == 4
    for queue, wanted in ((one, b"1"), (two, b"2")):
        assert [m.data for m in receive_exactly(v2.stream(queue), 1)] == [wanted]
    assert [m.data for m in receive_exactly(grouped, 1)] == [b"t"]
    (again,) = v2.publish(v2_pb2.OutboundMessage(topic=topic, data=b"t2", dedup_id="same"))
    assert again.duplicate and again.message_id == results[2].message_id
    assert grouped.quiet_for(0.7) == []


def test_dedup_holds_across_daemons_and_a_restart(make_daemon: Any) -> None:
    first_node, second_node = make_daemon(**QUICK), make_daemon(**QUICK)
    first_node.wait_ready()
    second_node.wait_ready()
    queue = unique_name("dedup-nodes")
    one, two = V2Client(first_node.grpc_address), V2Client(second_node.grpc_address)
    (stored,) = one.publish(message(queue, b"once", dedup_id="across"))
    (elsewhere,) = two.publish(message(queue, b"twice", dedup_id="across"))
    assert elsewhere.duplicate and elsewhere.message_id == stored.message_id
    one.close()
    two.close()
    assert first_node.stop(signal.SIGTERM) == 0
    assert second_node.stop(signal.SIGTERM) == 0

    restarted = make_daemon(**QUICK)
    restarted.wait_ready()
    three = V2Client(restarted.grpc_address)
    (after,) = three.publish(message(queue, b"thrice", dedup_id="across"))
    assert after.duplicate and after.message_id == stored.message_id
    got = receive_exactly(three.stream(queue), 1, settle=1.0)
    assert [(m.data, m.message_id) for m in got] == [(b"once", stored.message_id)]
    three.close()


def test_past_the_dedup_window_the_id_is_stored_again(make_daemon: Any) -> None:
    node = make_daemon(**quick(delivery={"dedup_window_seconds": 2}))
    node.wait_ready()
    v2 = V2Client(node.grpc_address)
    queue = unique_name("window")
    (first,) = v2.publish(message(queue, b"first", dedup_id="w"))
    stored_at = time.monotonic()
    (within,) = v2.publish(message(queue, b"within", dedup_id="w"))
    assert within.duplicate and within.message_id == first.message_id

    def publish_again() -> v2_pb2.PublishResult:
        (result,) = v2.publish(message(queue, b"after", dedup_id="w"))
        return result

    after = eventually(publish_again, lambda r: not r.duplicate, timeout=5, every=0.2)
    assert time.monotonic() - stored_at >= 1.9
    assert after.message_id != first.message_id
    got = receive_exactly(v2.stream(queue), 2, settle=1.0)
    assert [(m.data, m.message_id) for m in got] == [
        (b"first", first.message_id),
        (b"after", after.message_id),
    ]
    (within_again,) = v2.publish(message(queue, b"again", dedup_id="w"))
    assert within_again.duplicate and within_again.message_id == after.message_id
    v2.close()


def test_the_same_dedup_id_published_at_once_by_many_callers_is_stored_once(
    daemon: Any, v2: V2Client
) -> None:
    queue = unique_name("dedup-race")
    callers = 12
    barrier = threading.Barrier(callers)
    results: list[v2_pb2.PublishResult] = []

    def publish(n: int) -> None:
        client = V2Client(daemon.grpc_address)
        try:
            client.publish(message(queue, b"warm-up", dedup_id=f"warm-{n}"))
            barrier.wait(5)
            results.extend(
                _publish_retrying(client, message(queue, f"copy {n}".encode(), dedup_id="race"))
            )
        finally:
            client.close()

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert len(results) == callers
    assert len({r.message_id for r in results}) == 1
    stream = v2.stream(queue, max_outstanding_messages=1000)
    got = stream.receive(callers + 1) + stream.quiet_for(1.0)
    copies = [m.data for m in got if m.data.startswith(b"copy")]
    assert (len(copies), sum(not r.duplicate for r in results)) == (1, 1)


def _publish_retrying(
    client: V2Client, outbound: v2_pb2.OutboundMessage, patience: float = 8
) -> list[v2_pb2.PublishResult]:
    """Publish as a client that retries UNAVAILABLE does (dedup_id set: safe to retry)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return client.publish(outbound)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
