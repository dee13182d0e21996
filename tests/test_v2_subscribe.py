"""eventbus.v2.Subscriber through real daemons: StreamingPull's flow control, streams that break
or whose daemon dies, stale and made-up ack ids, ack deadlines missed, extended and cut to 0,
nacks with a delay or to the dead letters, max retries, the unary calls reaching a stream's
deliveries, and refused first requests."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from eventbus._generated import v2_pb2
from tests.servers import unique_name
from tests.v2_client import StreamHandle, V2Client, message
from tests.v2_support import (
    bound_group,
    daemon,
    dead_letters,
    dead_letters_of,
    invalid_ids_reported,
    quick,
    receive_exactly,
    v2,
)

__all__ = ["daemon", "v2"]  # fixtures

DEAD_ON_REQUEST = "nacked to dead letters by the subscriber"


def token_of(ack_id: str) -> str:
    return ack_id.partition(".")[0]


def started(make_daemon: Any, **sections: dict[str, Any]) -> tuple[Any, V2Client]:
    node = make_daemon(**quick(**sections))
    node.wait_ready()
    return node, V2Client(node.grpc_address)


def stream_error(stream: StreamHandle) -> grpc.RpcError:
    """The status the stream ends with (it must end with an error)."""
    with pytest.raises(grpc.RpcError) as caught:
        while True:
            stream.next_response(5)
    return caught.value


# Flow control


def test_a_stream_never_holds_more_than_max_outstanding(v2: V2Client) -> None:
    queue = unique_name("flow")
    results = v2.publish(*[message(queue, f"m{i}".encode()) for i in range(20)])
    stream = v2.stream(queue, max_outstanding_messages=5, ack_deadline_seconds=60)
    held = receive_exactly(stream, 5)
    seen = [m.message_id for m in held]
    while len(seen) < 20:
        stream.send(ack_ids=[m.ack_id for m in held[:2]])
        held = held[2:]
        more = receive_exactly(stream, min(2, 20 - len(seen)), settle=0.3)
        held += more
        seen += [m.message_id for m in more]
        assert len(held) <= 5
    assert sorted(seen) == sorted(r.message_id for r in results)
    stream.cancel()


# Streams that end or break, daemons that die


def test_a_broken_stream_loses_nothing_and_hands_back_only_the_unacked(v2: V2Client) -> None:
    queue = unique_name("broken")
    results = v2.publish(*[message(queue, f"m{i}".encode()) for i in range(30)])
    everything = {r.message_id for r in results}
    first = v2.stream(queue, max_outstanding_messages=10, ack_deadline_seconds=600)
    held = receive_exactly(first, 10, settle=0.3)
    first.send(ack_ids=[m.ack_id for m in held[:4]])
    acked = {m.message_id for m in held[:4]}
    held = held[4:] + receive_exactly(first, 4, settle=0.3)  # room freed: the acks were applied
    first.cancel()
    second = v2.stream(queue, max_outstanding_messages=100)
    started_at = time.monotonic()
    rest = receive_exactly(second, 26, settle=1.0)
    assert time.monotonic() - started_at < 3  # at once, not after the 600 s deadline
    assert {m.message_id for m in rest} == everything - acked
    assert {m.message_id for m in held} <= {m.message_id for m in rest}
    second.cancel()


def test_a_stream_that_ends_hands_back_its_unacked_at_once(v2: V2Client) -> None:
    queue = unique_name("ended")
    v2.publish(*[message(queue, f"m{i}".encode()) for i in range(4)])
    first = v2.stream(queue, ack_deadline_seconds=600)
    held = first.receive(4)
    first.send(ack_ids=[held[0].ack_id])
    first.close()  # half-close: the server ends the stream
    assert first.quiet_for(2) == []
    second = v2.stream(queue)
    back = receive_exactly(second, 3)
    assert sorted(m.message_id for m in back) == sorted(m.message_id for m in held[1:])
    second.cancel()


def test_messages_held_by_a_killed_daemon_go_to_another(make_daemon: Any) -> None:
    doomed, client = started(make_daemon)
    _, other = started(make_daemon)
    queue = unique_name("killed")
    results = client.publish(*[message(queue, f"m{i}".encode()) for i in range(5)])
    stream = client.stream(queue, ack_deadline_seconds=600)
    held = receive_exactly(stream, 5)
    waiting = other.stream(queue)
    assert waiting.quiet_for(0.5) == []
    doomed.process.kill()  # SIGKILL: no goodbye to RabbitMQ
    back = receive_exactly(waiting, 5, settle=1.0)
    assert sorted(m.message_id for m in back) == sorted(r.message_id for r in results)
    assert sorted(m.data for m in back) == sorted(m.data for m in held)
    assert other.acknowledge([m.ack_id for m in back]) == []
    waiting.cancel()


def test_a_stopping_daemon_ends_its_streams_and_another_gets_their_messages(
    make_daemon: Any,
) -> None:
    stopping, client = started(make_daemon)
    _, other = started(make_daemon)
    queue = unique_name("stopping")
    results = client.publish(*[message(queue, f"m{i}".encode()) for i in range(3)])
    stream = client.stream(queue, ack_deadline_seconds=600)
    receive_exactly(stream, 3)
    stopping.process.send_signal(signal.SIGTERM)
    assert stream_error(stream).code() == grpc.StatusCode.UNAVAILABLE
    assert stopping.wait_exit(10) == 0
    back = receive_exactly(other.stream(queue), 3)
    assert sorted(m.message_id for m in back) == sorted(r.message_id for r in results)


def test_a_slow_reader_of_large_messages_gets_responses_it_can_take(v2: V2Client) -> None:
    queue = unique_name("large")
    for batch in range(10):  # 200 messages of 150 KiB, 30 MiB in all
        v2.publish(*[message(queue, bytes([batch * 20 + i]) * 150 * 1024) for i in range(20)])
    call = v2.channel.stream_stream(
        "/eventbus.v2.Subscriber/StreamingPull",
        request_serializer=v2_pb2.StreamingPullRequest.SerializeToString,
        response_deserializer=v2_pb2.StreamingPullResponse.FromString,
    )
    done = threading.Event()

    def requests() -> Iterator[v2_pb2.StreamingPullRequest]:
        yield v2_pb2.StreamingPullRequest(
            queue=queue, max_outstanding_messages=200, ack_deadline_seconds=60
        )
        done.wait(15)  # no half-close: it would end the stream

    responses = call(requests(), timeout=15)
    time.sleep(2)  # the client reads nothing yet: the stream's deliveries pile up
    got: list[int] = []
    try:
        for response in responses:
            got += [m.data[0] for m in response.messages]
            if len(got) >= 200:
                break
    finally:
        done.set()
        responses.cancel()
    assert sorted(got) == list(range(200))


# Stale and made-up ack ids


def test_an_ack_after_a_nack_is_invalid_and_leaves_the_next_attempt_alone(v2: V2Client) -> None:
    queue = unique_name("stale")
    v2.publish(message(queue, b"again"))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (first,) = stream.receive(1)
    stream.send(nack_ids=[first.ack_id])
    (second,) = stream.receive(1)
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    stream.send(ack_ids=[first.ack_id], nack_ids=[first.ack_id])
    assert invalid_ids_reported(stream) == [first.ack_id, first.ack_id]
    assert v2.acknowledge([first.ack_id]) == [first.ack_id]
    assert v2.nack([first.ack_id]) == [first.ack_id]
    assert v2.modify([first.ack_id], 30) == [first.ack_id]
    assert stream.quiet_for(0.7) == []  # the second attempt is still held, untouched
    assert v2.acknowledge([second.ack_id]) == []
    stream.cancel()
    assert v2.stream(queue).quiet_for(1.0) == []


def test_an_ack_after_the_deadline_passed_and_the_message_came_again_is_invalid(
    v2: V2Client,
) -> None:
    queue = unique_name("late")
    v2.publish(message(queue, b"slow"))
    stream = v2.stream(queue, ack_deadline_seconds=1)
    (first,) = stream.receive(1)
    (second,) = stream.receive(1, timeout=4)  # missed deadline: attempt 2
    assert v2.modify([second.ack_id], 60) == []  # keep it while the stale ids are tried
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    stream.send(ack_ids=[first.ack_id])
    assert invalid_ids_reported(stream) == [first.ack_id]
    assert v2.acknowledge([first.ack_id]) == [first.ack_id]
    assert stream.quiet_for(1.5) == []  # not acked, not redelivered
    assert v2.acknowledge([second.ack_id]) == []
    stream.cancel()


def test_the_ack_ids_of_a_closed_stream_are_invalid_everywhere(v2: V2Client) -> None:
    queue = unique_name("closed")
    v2.publish(message(queue, b"one"))
    first = v2.stream(queue, ack_deadline_seconds=60)
    (old,) = first.receive(1)
    first.close()
    assert first.quiet_for(1.0) == []
    assert v2.acknowledge([old.ack_id]) == [old.ack_id]
    assert v2.modify([old.ack_id], 30) == [old.ack_id]
    second = v2.stream(queue, ack_deadline_seconds=60)
    (current,) = second.receive(1)
    assert current.message_id == old.message_id and current.ack_id != old.ack_id
    second.send(ack_ids=[old.ack_id], nack_ids=[old.ack_id])
    assert invalid_ids_reported(second) == [old.ack_id, old.ack_id]
    assert second.quiet_for(0.5) == []
    assert v2.acknowledge([current.ack_id]) == []
    second.cancel()


def test_made_up_ack_ids_are_invalid_and_touch_nothing(v2: V2Client) -> None:
    queue = unique_name("madeup")
    v2.publish(message(queue, b"one"))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (held,) = stream.receive(1)
    token, _, tag = held.ack_id.partition(".")
    made_up = [
        "",
        "nonsense",
        f"{token}.{int(tag) + 1000}",
        f"{token}.0",
        f"{token}.-1",
        f"{token}.{tag}x",
        f"{token}.{tag}.{tag}",
        f"{token.upper()}.{tag}",
        f"{'0' * 16}.{tag}",
        f"{token}.{'9' * 30}",
        str(uuid.uuid4()),
        held.ack_id + " ",
    ]
    stream.send(ack_ids=made_up[:6], nack_ids=made_up[6:])
    assert sorted(invalid_ids_reported(stream)) == sorted(made_up)
    stream.send(modify_deadline_ack_ids=made_up, modify_deadline_seconds=[0])
    assert sorted(invalid_ids_reported(stream)) == sorted(made_up)
    stream_like = [i for i in made_up if i.count(".") == 1 and len(i.split(".")[0]) == 16]
    assert sorted(v2.acknowledge(stream_like)) == sorted(stream_like)
    assert sorted(v2.nack(stream_like)) == sorted(stream_like)
    assert sorted(v2.modify([*stream_like, "nonsense"], 0)) == sorted([*stream_like, "nonsense"])
    assert stream.quiet_for(0.5) == []
    assert v2.acknowledge([held.ack_id]) == []
    stream.cancel()


# Ack deadlines


def test_a_missed_deadline_brings_attempt_2(v2: V2Client) -> None:
    queue = unique_name("deadline")
    (result,) = v2.publish(message(queue, b"slow"))
    stream = v2.stream(queue, ack_deadline_seconds=1)
    (first,) = stream.receive(1)
    received_at = time.time()
    deadline = first.deadline.ToMicroseconds() / 1e6
    assert received_at - 0.5 <= deadline - 1 <= received_at + 0.5
    (second,) = stream.receive(1, timeout=4)
    assert time.time() - received_at >= 0.9
    assert (second.message_id, second.attempt, second.data) == (result.message_id, 2, b"slow")
    assert second.ack_id != first.ack_id
    stream.send(ack_ids=[second.ack_id])
    assert stream.quiet_for(1.8) == []
    stream.cancel()


def test_an_extended_deadline_keeps_the_message_held(v2: V2Client) -> None:
    queue = unique_name("extend")
    v2.publish(message(queue, b"a"), message(queue, b"b"))
    stream = v2.stream(queue, ack_deadline_seconds=1)
    got = stream.receive(2)
    by = {m.data: m for m in got}
    stream.send(modify_deadline_ack_ids=[by[b"a"].ack_id], modify_deadline_seconds=[4])
    back = stream.receive(1, timeout=3)  # b missed its deadline; a did not
    assert [(m.data, m.attempt) for m in back] == [(b"b", 2)]
    stream.send(ack_ids=[back[0].ack_id])
    assert stream.quiet_for(1.0) == []  # a still held, 2 s past its first deadline
    assert v2.acknowledge([by[b"a"].ack_id]) == []
    stream.cancel()


def test_modify_deadline_to_0_nacks_now(v2: V2Client) -> None:
    queue = unique_name("zero")
    v2.publish(message(queue, b"a"), message(queue, b"b"))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    by = {m.data: m for m in stream.receive(2)}
    stream.send(
        modify_deadline_ack_ids=[by[b"a"].ack_id, by[b"b"].ack_id],
        modify_deadline_seconds=[0, 30],
    )
    (again,) = receive_exactly(stream, 1)
    assert (again.data, again.attempt) == (b"a", 2)
    assert v2.acknowledge([by[b"a"].ack_id, by[b"b"].ack_id]) == [by[b"a"].ack_id]
    stream.cancel()


# Nacks, delays and dead letters


def test_a_nack_on_the_stream_waits_for_the_queue_backoff(make_daemon: Any) -> None:
    _, client = started(make_daemon, delivery={"nack_redelivery_delay_seconds": 2})
    queue = unique_name("backoff")
    client.publish(message(queue, b"later"))
    stream = client.stream(queue, ack_deadline_seconds=60)
    (first,) = stream.receive(1)
    nacked_at = time.monotonic()
    stream.send(nack_ids=[first.ack_id])
    (second,) = stream.receive(1, timeout=5)
    waited = time.monotonic() - nacked_at
    assert 2.0 <= waited < 3.5, waited
    assert (second.message_id, second.attempt) == (first.message_id, 2)
    stream.cancel()


def test_a_unary_nack_with_a_delay_comes_back_no_earlier(v2: V2Client) -> None:
    queue = unique_name("nack-delay")
    v2.publish(message(queue, b"later", attributes={"k": "v"}))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (first,) = stream.receive(1)
    nacked_at = time.monotonic()
    assert v2.nack([first.ack_id], delay=2) == []
    (second,) = stream.receive(1, timeout=5)
    waited = time.monotonic() - nacked_at
    assert 2.0 <= waited < 3.5, waited
    assert (second.message_id, second.attempt, second.data) == (first.message_id, 2, b"later")
    assert dict(second.attributes) == {"k": "v"}
    assert second.publish_time == first.publish_time
    stream.cancel()


def test_a_message_whose_ttl_ends_during_its_nack_delay_is_never_handed_out(
    v2: V2Client,
) -> None:
    queue = unique_name("ttl-nack")
    v2.publish(message(queue, b"short", ttl_seconds=2))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (first,) = stream.receive(1)
    assert v2.nack([first.ack_id], delay=3) == []
    assert stream.quiet_for(4.0) == []


def test_a_nack_to_the_dead_letters(v2: V2Client, backends: Any) -> None:
    queue = unique_name("dead")
    data = bytes(range(256))
    (result,) = v2.publish(message(queue, data, attributes={"why": "test"}))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (held,) = stream.receive(1)
    assert v2.nack([held.ack_id], dead_letter=True) == []
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert letter["message_id"] == result.message_id
    assert (letter["body"], letter["attempts"]) == (data, 1)
    assert letter["reason"] == DEAD_ON_REQUEST
    assert '"why"' in (letter["attributes"] or "")
    assert stream.quiet_for(0.5) == []
    assert v2.acknowledge([held.ack_id]) == [held.ack_id]
    stream.cancel()


def test_past_max_retries_a_message_becomes_a_dead_letter(make_daemon: Any, backends: Any) -> None:
    _, client = started(make_daemon, delivery={"max_retries": 1})
    queue = unique_name("retried")
    (result,) = client.publish(message(queue, b"doomed"))
    stream = client.stream(queue, ack_deadline_seconds=60)
    (first,) = stream.receive(1)
    stream.send(nack_ids=[first.ack_id])
    (second,) = stream.receive(1)
    assert second.attempt == 2
    assert dead_letters(backends.postgres_dsn, queue) == []
    stream.send(nack_ids=[second.ack_id])
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert (letter["message_id"], letter["attempts"]) == (result.message_id, 2)
    assert not letter["reason"]
    assert stream.quiet_for(0.7) == []


POLICY = {'queues."policy-*"': {"ack_deadline_seconds": 2, "max_retries": 0}}


def test_a_queue_policy_max_retries_applies_to_streams(make_daemon: Any, backends: Any) -> None:
    _, client = started(make_daemon, **POLICY)
    queue, other = unique_name("policy-q"), unique_name("plain")
    results = client.publish(message(queue, b"strict"), message(other, b"lenient"))
    strict, lenient = client.stream(queue, ack_deadline_seconds=60), client.stream(other)
    (held,) = strict.receive(1)
    (plain,) = lenient.receive(1)
    strict.send(nack_ids=[held.ack_id])  # max_retries 0: a dead letter at once
    lenient.send(nack_ids=[plain.ack_id])  # [delivery] max_retries 3: attempt 2
    (letter,) = dead_letters_of(backends.postgres_dsn, queue, 1)
    assert (letter["message_id"], letter["attempts"]) == (results[0].message_id, 1)
    assert [(m.data, m.attempt) for m in lenient.receive(1)] == [(b"lenient", 2)]
    assert strict.quiet_for(0.5) == []


def test_a_queue_policy_ack_deadline_applies_to_streams(make_daemon: Any) -> None:
    _, client = started(make_daemon, **POLICY)
    queue = unique_name("policy-q")
    client.publish(message(queue, b"strict"))
    stream = client.stream(queue)  # ack_deadline_seconds 0: the queue's policy
    (held,) = stream.receive(1)
    given = held.deadline.ToMicroseconds() - held.publish_time.ToMicroseconds()
    assert 1.5e6 <= given <= 3e6, given / 1e6


def test_a_retry_goes_only_to_the_topic_group_that_failed_it(v2: V2Client) -> None:
    topic = unique_name("t")
    failing, content = (
        bound_group(v2, topic, unique_name(g), ack_deadline_seconds=60) for g in ("fail", "ok")
    )
    v2.publish(v2_pb2.OutboundMessage(topic=topic, data=b"fan-out"))
    (bad,) = failing.receive(1)
    (good,) = content.receive(1)
    failing.send(nack_ids=[bad.ack_id])
    (again,) = receive_exactly(failing, 1)
    assert (again.message_id, again.attempt) == (bad.message_id, 2)
    assert content.quiet_for(0.5) == []
    assert v2.acknowledge([good.ack_id, again.ack_id]) == []


# Unary calls reaching a stream's deliveries


def test_unary_acknowledge_and_modify_reach_the_streams_deliveries(v2: V2Client) -> None:
    queue = unique_name("unary")
    v2.publish(*[message(queue, d) for d in (b"acked", b"extended", b"left", b"dropped")])
    stream = v2.stream(queue, ack_deadline_seconds=1)
    by = {m.data: m for m in stream.receive(4)}
    assert v2.acknowledge([by[b"acked"].ack_id]) == []
    assert v2.modify([by[b"extended"].ack_id], 30) == []
    assert v2.modify([by[b"dropped"].ack_id], 0) == []
    back = stream.receive(2, timeout=4)  # dropped at once; left after its 1 s deadline
    assert sorted((m.data, m.attempt) for m in back) == [(b"dropped", 2), (b"left", 2)]
    assert v2.acknowledge([m.ack_id for m in back]) == []
    assert stream.quiet_for(1.0) == []  # acked and extended stay away
    assert v2.acknowledge([by[b"extended"].ack_id, by[b"acked"].ack_id]) == [by[b"acked"].ack_id]
    stream.cancel()


# Refused requests


@pytest.mark.parametrize(
    ("first", "named"),
    [
        ({"queue": ""}, "queue"),
        ({"queue": "amq.nope"}, "queue"),
        ({"queue": "g", "topic": "amq.nope"}, "topic"),
        ({"queue": "q", "max_outstanding_messages": 10_001}, "max_outstanding_messages"),
        ({"queue": "q", "ack_deadline_seconds": 601}, "ack_deadline_seconds"),
    ],
)
def test_a_bad_first_request_is_invalid_argument(
    v2: V2Client, first: dict[str, Any], named: str
) -> None:
    stream = v2.stream(**first)
    error = stream_error(stream)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (error.details() or "")


def test_bad_later_requests_and_unary_arguments_are_invalid_argument(v2: V2Client) -> None:
    queue = unique_name("badlater")
    v2.publish(message(queue, b"x"))
    stream = v2.stream(queue, ack_deadline_seconds=60)
    (held,) = stream.receive(1)
    ids = [held.ack_id, held.ack_id]
    stream.send(modify_deadline_ack_ids=ids, modify_deadline_seconds=[1, 2, 3])  # 3 for 2
    assert stream_error(stream).code() == grpc.StatusCode.INVALID_ARGUMENT
    for call in (
        lambda: v2.modify([held.ack_id], 601),
        lambda: v2.nack([held.ack_id], delay=400 * 86400),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    back = v2.stream(queue)
    assert [m.data for m in receive_exactly(back, 1)] == [b"x"]  # the broken stream gave it back
    back.cancel()
