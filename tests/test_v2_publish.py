"""eventbus.v2.Publisher/Publish through a real daemon: batches to queues and topics, results in
request order, bytes and attributes unchanged, TTL, delay, every refusal of a batch (which then
stores nothing) and the size limit."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from eventbus._generated import v2_pb2
from tests.servers import unique_name
from tests.v2_client import V2Client, message
from tests.v2_support import bound_group, daemon, quick, receive_exactly, v2

__all__ = ["daemon", "v2"]  # fixtures

ALL_BYTES = bytes(range(256))


def by_data(received: list[v2_pb2.ReceivedMessage]) -> dict[bytes, v2_pb2.ReceivedMessage]:
    found = {m.data: m for m in received}
    assert len(found) == len(received), "a message came twice"
    return found


def test_a_mixed_batch_reaches_queues_and_topic_groups_with_results_in_request_order(
    v2: V2Client,
) -> None:
    one, two, topic = unique_name("q1"), unique_name("q2"), unique_name("t")
    groups = [bound_group(v2, topic, unique_name(f"g{i}")) for i in range(2)]
    batch = [
        message(one, b"a"),
        v2_pb2.OutboundMessage(topic=topic, data=b"b", attributes={"n": "1"}),
        message(two, b"c"),
        v2_pb2.OutboundMessage(topic=topic, data=b"d"),
        message(one, b"e"),
    ]
    results = v2.publish(*batch)
    assert len(results) == 5 and len({r.message_id for r in results}) == 5
    assert not any(r.duplicate for r in results)
    ids = {m.data: r.message_id for m, r in zip(batch, results, strict=True)}

    for queue, wanted in ((one, [b"a", b"e"]), (two, [b"c"])):
        got = receive_exactly(v2.stream(queue), len(wanted))
        assert [m.data for m in got] == wanted
        assert [m.message_id for m in got] == [ids[d] for d in wanted]
        assert {m.queue for m in got} == {queue}
    acks = set()
    for group in groups:
        copies = by_data(receive_exactly(group, 2))
        assert sorted(copies) == [b"b", b"d"]
        assert [copies[d].message_id for d in (b"b", b"d")] == [ids[b"b"], ids[b"d"]]
        assert dict(copies[b"b"].attributes) == {"n": "1"}
        acks |= {m.ack_id for m in copies.values()}
    assert len(acks) == 4  # each group's copy is a delivery of its own


def test_a_full_batch_over_several_queues_keeps_request_order(v2: V2Client) -> None:
    queues = [unique_name(f"full{i}") for i in range(5)]
    batch = [message(queues[i % 5], f"m{i}".encode()) for i in range(1000)]
    results = v2.publish(*batch)
    assert len(results) == 1000 and len({r.message_id for r in results}) == 1000
    for n, queue in enumerate(queues):
        got = receive_exactly(v2.stream(queue, max_outstanding_messages=1000), 200, settle=0.3)
        assert [m.data for m in got] == [f"m{i}".encode() for i in range(n, 1000, 5)]
        assert [m.message_id for m in got] == [r.message_id for r in results[n::5]]


def test_a_topic_nobody_listens_to_takes_the_message(v2: V2Client) -> None:
    topic, queue = unique_name("lonely"), unique_name("q")
    results = v2.publish(
        v2_pb2.OutboundMessage(topic=topic, data=b"to nobody"), message(queue, b"kept")
    )
    assert len(results) == 2 and all(r.message_id for r in results)
    assert [m.data for m in receive_exactly(v2.stream(queue), 1)] == [b"kept"]


def test_binary_data_and_attributes_arrive_unchanged(v2: V2Client) -> None:
    queue = unique_name("bytes")
    attributes = {
        "kind": "order",
        "région": "île-de-france ✓ 日本",
        "empty": "",
        "spaces in a key": "tabs\tline\nbreaks\r\nand \u2028 separators",
        "k" * 128: "v" * 10_000,  # the longest key an AMQP header carries
    }
    many = {f"key{i}": str(i) for i in range(100)}  # the most a message may carry
    started = time.time()
    results = v2.publish(
        message(queue, ALL_BYTES, attributes=attributes),
        message(queue, ALL_BYTES[::-1] * 64, attributes=many),
        message(queue, b"", attributes={"only": "attributes"}),
        message(queue, b"\x00"),
    )
    got = receive_exactly(v2.stream(queue, ack_deadline_seconds=30), 4)
    assert [m.message_id for m in got] == [r.message_id for r in results]
    assert [m.data for m in got] == [ALL_BYTES, ALL_BYTES[::-1] * 64, b"", b"\x00"]
    assert [dict(m.attributes) for m in got] == [attributes, many, {"only": "attributes"}, {}]
    for m in got:
        assert m.attempt == 1
        published = m.publish_time.ToMicroseconds() / 1e6
        assert started - 1 <= published <= time.time() + 1
        assert 29 <= m.deadline.ToMicroseconds() / 1e6 - published <= 32


def test_a_long_attribute_key_is_refused_or_kept_never_cut_short(v2: V2Client) -> None:
    queue = unique_name("long-key")
    key = "é" * 100  # 200 bytes
    try:
        v2.publish(message(queue, b"x", attributes={key: "v"}))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "messages[0].attributes" in (error.details() or "")
        return
    (got,) = receive_exactly(v2.stream(queue), 1)
    assert dict(got.attributes) == {key: "v"}


def test_a_message_past_its_ttl_is_never_handed_out(v2: V2Client) -> None:
    queue = unique_name("ttl")
    v2.publish(message(queue, b"short", ttl_seconds=1), message(queue, b"kept"))
    time.sleep(1.3)
    got = receive_exactly(v2.stream(queue), 1, settle=1.0)
    assert [m.data for m in got] == [b"kept"]


def test_a_message_held_past_its_ttl_by_a_broken_stream_is_not_handed_out_again(
    v2: V2Client,
) -> None:
    queue = unique_name("ttl")
    v2.publish(message(queue, b"short", ttl_seconds=2), message(queue, b"kept"))
    first = v2.stream(queue, ack_deadline_seconds=60)
    assert sorted(m.data for m in first.receive(2)) == [b"kept", b"short"]
    time.sleep(2.2)
    first.cancel()
    got = receive_exactly(v2.stream(queue), 1, settle=1.0)
    assert [m.data for m in got] == [b"kept"]


def test_a_delayed_message_arrives_when_due_not_before(v2: V2Client) -> None:
    queue, topic, group = unique_name("later"), unique_name("t"), unique_name("g")
    grouped = bound_group(v2, topic, group)
    stream = v2.stream(queue)
    published = time.monotonic()
    results = v2.publish(
        message(queue, b"due", delay_seconds=2, attributes={"a": "1"}),
        v2_pb2.OutboundMessage(topic=topic, data=b"topic due", delay_seconds=2),
        message(queue, b"now"),
    )
    (now,) = stream.receive(1)
    assert now.data == b"now" and now.message_id == results[2].message_id
    assert time.monotonic() - published < 1.5
    (due,) = stream.receive(1, timeout=5)
    waited = time.monotonic() - published
    (topic_due,) = grouped.receive(1, timeout=5)
    assert 2.0 <= waited < 3.0, waited  # due, and within a few cron ticks (0.2 s)
    assert (due.data, dict(due.attributes), due.attempt) == (b"due", {"a": "1"}, 1)
    assert due.message_id == results[0].message_id
    assert topic_due.data == b"topic due" and topic_due.message_id == results[1].message_id
    assert stream.quiet_for(0.5) == []


# Refusals: the batch is refused whole, naming the message and the field.


def refusals(namespace: str, queue: str) -> list[tuple[list[v2_pb2.OutboundMessage], str]]:
    """(batch, what the refusal must name); each batch's first messages are valid."""
    valid = [
        message(queue, b"ok"),
        message(queue, b"ok later", delay_seconds=1),
        message(queue, b"ok once", dedup_id="kept-out"),
    ]

    def bad(**fields: Any) -> list[v2_pb2.OutboundMessage]:
        fields.setdefault("data", b"x")
        return [*valid, v2_pb2.OutboundMessage(**fields)]

    return [
        ([], "messages"),
        ([message(queue)] * 1001, "1000"),
        (bad(queue=queue, topic="t"), "messages[3]"),
        (bad(), "messages[3].queue"),
        (bad(queue="amq.q"), "messages[3].queue"),
        (bad(topic="amq.t"), "messages[3].topic"),
        (bad(queue="q" * 256), "messages[3].queue"),
        (bad(queue="bad*name"), "messages[3].queue"),
        (bad(queue="bad\nname"), "messages[3].queue"),
        (bad(queue=f"{namespace}.confirm"), "messages[3].queue"),
        (bad(topic=namespace), "messages[3].topic"),
        (bad(queue=queue, data=b""), "messages[3]"),
        (bad(queue=queue, attributes={"x-eventbus-attempt": "2"}), "messages[3].attributes"),
        (bad(queue=queue, attributes={"X-EventBus-Mine": "2"}), "messages[3].attributes"),
        (bad(queue=queue, attributes={"k": "a\x00b"}), "messages[3].attributes"),
        (bad(queue=queue, attributes={"a\x00b": "v"}), "messages[3].attributes"),
        (bad(queue=queue, attributes={"": "v"}), "messages[3].attributes"),
        (bad(queue=queue, attributes={"k" * 256: "v"}), "messages[3].attributes"),
        (
            bad(queue=queue, attributes={f"k{i}": "v" for i in range(101)}),
            "messages[3].attributes",
        ),
        (bad(queue=queue, attributes={"big": "v" * 40_000}), "messages[3].attributes"),
        (bad(queue=queue, ttl_seconds=3650 * 86400 + 1), "messages[3].ttl_seconds"),
        (bad(queue=queue, delay_seconds=101), "messages[3].delay_seconds"),
        (bad(queue=queue, dedup_id="d" * 257), "messages[3].dedup_id"),
        (bad(queue=queue, dedup_id="a\x00b"), "messages[3].dedup_id"),
    ]


def test_every_refusal_names_the_message_and_field_and_stores_nothing(
    make_daemon: Any, backends: Any
) -> None:
    started = make_daemon(**quick(delivery={"max_delay_seconds": 100}))
    started.wait_ready()
    v2 = V2Client(started.grpc_address)
    queue = unique_name("refused")
    wrong = []
    for batch, named in refusals(backends.namespace, queue):
        try:
            v2.publish(*batch)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            if code != grpc.StatusCode.INVALID_ARGUMENT or named not in details:
                wrong.append((len(batch), named, code, details))
        else:
            wrong.append((len(batch), named, "stored", ""))
    assert wrong == []
    stream = v2.stream(queue)
    assert stream.quiet_for(1.5) == []  # the delayed one of each batch would be due by now
    (fresh,) = v2.publish(message(queue, b"once", dedup_id="kept-out"))
    assert not fresh.duplicate  # no refused batch reserved its dedup id
    assert [m.data for m in stream.receive(1)] == [b"once"]
    stream.cancel()
    v2.close()


def test_a_request_over_max_message_bytes_is_resource_exhausted(make_daemon: Any) -> None:
    started = make_daemon(**quick(server={"max_message_bytes": 64 * 1024}))
    started.wait_ready()
    v2 = V2Client(started.grpc_address)
    queue = unique_name("big")
    with pytest.raises(grpc.RpcError) as caught:
        v2.publish(message(queue, b"x" * 40_000), message(queue, b"y" * 40_000))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    v2.publish(message(queue, b"z" * 40_000))
    got = receive_exactly(v2.stream(queue), 1)
    assert [m.data for m in got] == [b"z" * 40_000]
    v2.close()
