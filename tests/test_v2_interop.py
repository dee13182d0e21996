"""v1 and v2 side by side on one daemon: each one's messages reach the other's subscribers, on
queues and on topic groups; a v1 delivery settled through v2; data v1 cannot carry; and the v2
services listed by reflection and reported by the health service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse

from eventbus._generated import v2_pb2
from tests.bus_client import BusClient
from tests.servers import unique_name
from tests.v2_client import V2Client, message
from tests.v2_support import bound_group, dead_letters_of, quick, receive_exactly

V2_SERVICES = {"eventbus.v2.Publisher", "eventbus.v2.Subscriber"}
NOT_UTF8 = b"\xff\xfe not text"


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    # A v1 delivery not acked within 1 s comes back at the next republish tick.
    node = make_daemon(**quick(delivery={"ack_deadline_seconds": 1}))
    node.wait_ready()
    return node


@pytest.fixture
def clients(daemon: Any) -> Iterator[tuple[BusClient, V2Client]]:
    v1, v2 = BusClient(daemon.grpc_address), V2Client(daemon.grpc_address)
    yield v1, v2
    v1.close()
    v2.close()


def test_a_v1_message_reaches_a_v2_stream_as_utf8_bytes(
    clients: tuple[BusClient, V2Client],
) -> None:
    v1, v2 = clients
    queue = unique_name("v1-to-v2")
    v1.publish(queue, "héllo ✓ 日本")
    v1.delay_publish(queue, "later", delay=1)
    stream = v2.stream(queue, ack_deadline_seconds=30)
    got = stream.receive(2, timeout=5)
    assert [m.data for m in got] == ["héllo ✓ 日本".encode(), b"later"]
    assert all(m.attempt == 1 and m.message_id and not m.attributes for m in got)
    assert all(abs(m.publish_time.ToMicroseconds() / 1e6 - time.time()) < 10 for m in got)
    assert len({m.message_id for m in got}) == 2
    assert v2.acknowledge([m.ack_id for m in got]) == []
    stream.cancel()


def test_a_v2_message_reaches_a_v1_subscriber_whose_ack_holds(
    clients: tuple[BusClient, V2Client],
) -> None:
    v1, v2 = clients
    queue = unique_name("v2-to-v1")
    v2.publish(
        message(queue, "acked ✓".encode(), attributes={"k": "v"}), message(queue, b"left alone")
    )
    acked = v1.subscribe(queue)
    assert (acked.data, acked.queue) == ("acked ✓", queue)
    v1.ack(acked.id)
    left = v1.subscribe(queue)
    assert left.data == "left alone"
    again = v1.subscribe(queue, timeout=5)  # its 1 s deadline passed: it comes back
    assert again.data == "left alone" and again.id != left.id
    v1.ack(again.id)
    assert v1.try_subscribe(queue, timeout=2.5) is None  # the acked one never came back


def test_a_v1_delivery_can_be_settled_through_v2(clients: tuple[BusClient, V2Client]) -> None:
    v1, v2 = clients
    queue = unique_name("v1-settled-by-v2")
    v1.publish(queue, "acked by v2")
    v1.publish(queue, "nacked by v2")
    acked, nacked = v1.subscribe(queue), v1.subscribe(queue)
    assert v2.acknowledge([acked.id]) == []
    assert v2.nack([nacked.id]) == []
    back = v1.subscribe(queue, timeout=5)
    assert back.data == "nacked by v2" and back.id not in (acked.id, nacked.id)
    assert v2.acknowledge([back.id, acked.id]) == []  # v1 ids stay idempotent
    assert v1.try_subscribe(queue, timeout=2.5) is None


def test_data_a_v1_subscriber_cannot_carry_is_dead_lettered_and_blocks_nothing(
    clients: tuple[BusClient, V2Client], backends: Any
) -> None:
    v1, v2 = clients
    queue = unique_name("not-utf8")
    (binary, _) = v2.publish(message(queue, NOT_UTF8), message(queue, b"text"))
    got = v1.subscribe(queue)
    assert got.data == "text"
    v1.ack(got.id)
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert letter["message_id"] == binary.message_id and letter["body"] == NOT_UTF8
    assert "UTF-8" in (letter["reason"] or "")


def test_attempts_count_across_v1_and_v2_toward_max_retries(
    make_daemon: Any, backends: Any
) -> None:
    node = make_daemon(**quick(delivery={"max_retries": 1, "ack_deadline_seconds": 30}))
    node.wait_ready()
    v1, v2 = BusClient(node.grpc_address), V2Client(node.grpc_address)
    queue = unique_name("mixed-retries")
    (result,) = v2.publish(message(queue, b"fails twice"))
    stream = v2.stream(queue)
    (first,) = stream.receive(1)
    stream.send(nack_ids=[first.ack_id])  # attempt 1 failed on v2
    stream.close()
    second = v1.subscribe(queue, timeout=5)
    assert second.data == "fails twice"
    v1.nack(second.id)  # attempt 2 failed on v1: max_retries 1 is spent
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert (letter["message_id"], letter["attempts"]) == (result.message_id, 2)
    assert v1.try_subscribe(queue, timeout=1.0) is None
    v1.close()
    v2.close()


def test_topic_groups_are_shared_by_v1_and_v2(clients: tuple[BusClient, V2Client]) -> None:
    v1, v2 = clients
    topic = unique_name("t")
    v1_group, v2_group, shared = unique_name("v1g"), unique_name("v2g"), unique_name("shared")
    assert v1.try_topic_subscribe(topic, v1_group, timeout=0.5) is None  # binds v1_group
    streams = {
        group: bound_group(v2, topic, group, ack_deadline_seconds=30)
        for group in (v2_group, shared)
    }
    v1.topic_publish(topic, "from v1")
    v2.publish(v2_pb2.OutboundMessage(topic=topic, data="from v2 ✓".encode()))
    wanted = sorted([b"from v1", "from v2 ✓".encode()])

    assert sorted(m.data for m in receive_exactly(streams[v2_group], 2)) == wanted
    from_v1 = [v1.topic_subscribe(topic, v1_group) for _ in range(2)]
    assert sorted(r.data.encode() for r in from_v1) == wanted
    for reply in from_v1:
        v1.topic_ack(reply.id)
    # The shared group's messages go to its one v2 stream; a v1 subscriber of the same group
    # gets what the stream gives back.
    held = receive_exactly(streams[shared], 2)
    assert sorted(m.data for m in held) == wanted
    streams[shared].cancel()
    from_shared = [v1.topic_subscribe(topic, shared) for _ in range(2)]
    assert sorted(r.data.encode() for r in from_shared) == wanted
    assert v1.try_topic_subscribe(topic, v1_group, timeout=0.5) is None
    streams[v2_group].cancel()


def test_a_topic_group_split_between_v1_and_v2_gets_each_message_once(
    clients: tuple[BusClient, V2Client],
) -> None:
    v1, v2 = clients
    topic, group = unique_name("t"), unique_name("split")
    stream = bound_group(v2, topic, group, max_outstanding_messages=3, ack_deadline_seconds=30)
    v1.topic_publish(topic, "m0")
    v2.publish(*[v2_pb2.OutboundMessage(topic=topic, data=f"m{i}".encode()) for i in range(1, 10)])
    on_stream = stream.receive(3)
    on_v1 = []
    while (reply := v1.try_topic_subscribe(topic, group, timeout=1.5)) is not None:
        on_v1.append(reply)
        v1.topic_ack(reply.id)
    on_stream += stream.quiet_for(0.3)
    assert len(on_stream) == 3
    received = [m.data.decode() for m in on_stream] + [r.data for r in on_v1]
    assert sorted(received) == [f"m{i}" for i in range(10)]


# Reflection and health


def listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=ServerReflectionRequest.SerializeToString,
            response_deserializer=ServerReflectionResponse.FromString,
        )
        replies = list(info(iter([ServerReflectionRequest(list_services="")]), timeout=5))
    return {s.name for s in replies[0].list_services_response.service}


def described_file(address: str, symbol: str) -> ServerReflectionResponse:
    with grpc.insecure_channel(address) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=ServerReflectionRequest.SerializeToString,
            response_deserializer=ServerReflectionResponse.FromString,
        )
        request = ServerReflectionRequest(file_containing_symbol=symbol)
        return next(iter(info(iter([request]), timeout=5)))


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        return int(check(HealthCheckRequest(service=service), timeout=5).status)


def test_reflection_lists_the_v2_services_and_health_reports_them_serving(daemon: Any) -> None:
    address = daemon.grpc_address
    assert V2_SERVICES | {"mq.Mq", "mq.MqTopic"} <= listed_services(address)
    for service in V2_SERVICES:
        assert health(address, service) == HealthCheckResponse.SERVING
        reply = described_file(address, service)
        assert reply.file_descriptor_response.file_descriptor_proto, reply
    with pytest.raises(grpc.RpcError) as caught:
        health(address, "eventbus.v2.Nothing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
