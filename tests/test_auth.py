"""Identities and permissions against a real daemon in auth.mode "token": every v1 and v2 call
with an allowed identity, a forbidden one, no token, a wrong token and a malformed header; no
refusal tells whether a queue exists; deliveries settle only by the identity they were handed
to; tokens from grpcio and grpclib; health and reflection without a token; refusals counted and
logged; and auth.mode "off" as before, with its warning on an open address."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.reflection.v1.reflection_pb2 import ServerReflectionRequest, ServerReflectionResponse

from eventbus._generated import mq_pb2, v2_pb2
from eventbus._generated.mq_grpc import MqStub
from eventbus._generated.v2_grpc import PublisherStub, SubscriberStub
from tests import servers
from tests.conftest import Backends
from tests.daemon_process import DaemonProcess

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

SUBSCRIBABLE = ["orders.*", "events.*", "group.*"]
PERMISSIONS: dict[str, dict[str, Any]] = {
    "worker": {"publish": ["orders.*", "events.*"], "subscribe": SUBSCRIBABLE},
    "peer": {"subscribe": SUBSCRIBABLE},  # subscribes where worker does, publishes nowhere
    "writer": {"publish": ["orders.*", "events.*"]},
    "stranger": {},  # may do nothing
    "ops": {"admin": True},
    "topic-only": {"subscribe": ["events.*"]},
    "group-only": {"subscribe": ["group.*"]},
    "noisy": {},  # refused in the log test only
}
TOKENS = {name: secrets.token_urlsafe(32) for name in PERMISSIONS}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def identities() -> dict[str, dict[str, Any]]:
    return {
        f"auth.identities.{name}": {"token_sha256": sha256(TOKENS[name]), **permissions}
        for name, permissions in PERMISSIONS.items()
    }


QUICK = {
    "delivery": {"nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
}


@pytest.fixture(scope="module")
def bus(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon in auth.mode "token" for the whole module, on backends of its own."""
    database = servers.unique_name("eventbus_test")
    dsn = servers.create_database(database)
    prefix = servers.unique_name("eventbus_test") + ":"
    backends = Backends(amqp_url, dsn, prefix, servers.unique_name("ns"))
    directory = tmp_path_factory.mktemp("auth") / "node0"
    daemon = DaemonProcess(directory, backends, auth={"mode": "token"}, **QUICK, **identities())
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.kill()
        servers.drop_database(database)
        servers.delete_redis_keys(prefix)


@pytest.fixture(scope="module")
def channel(bus: DaemonProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(bus.grpc_address) as opened:
        yield opened


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


# Calling with credentials


@dataclass(frozen=True)
class As:
    """Who calls: a named identity's token, or a raw authorization header, or nothing."""

    identity: str | None = None
    header: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.header is not None:
            return (("authorization", self.header),)
        if self.identity is not None:
            return (("authorization", f"Bearer {TOKENS[self.identity]}"),)
        return ()


NO_TOKEN = As()
WRONG_TOKEN = As(header=f"Bearer {secrets.token_urlsafe(32)}")
MALFORMED = As(header=f"Basic {TOKENS['worker']}")
WORKER, PEER, WRITER, STRANGER, OPS = (
    As("worker"),
    As("peer"),
    As("writer"),
    As("stranger"),
    As("ops"),
)
UNAUTHENTICATED_CALLERS = {"no token": NO_TOKEN, "wrong token": WRONG_TOKEN, "malformed": MALFORMED}


def unary(
    channel: grpc.Channel, path: str, request: Any, reply: Any, who: As, timeout: float = 10
) -> Any:
    call = channel.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=reply.FromString,
    )
    return call(request, timeout=timeout, metadata=who.metadata())


def outcome(work: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        work()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def publish_v1(channel: grpc.Channel, queue: str, data: str = "x", who: As = WORKER) -> None:
    unary(channel, "/mq.Mq/publish", mq_pb2.PublishRequest(queue=queue, data=data), Empty, who)


def subscribe_v1(
    channel: grpc.Channel, queue: str, who: As = WORKER, timeout: float = 10
) -> mq_pb2.SubscribeResponse:
    request = mq_pb2.SubscribeRequest(queue=queue)
    return unary(channel, "/mq.Mq/subscribe", request, mq_pb2.SubscribeResponse, who, timeout)


def settle_v1(channel: grpc.Channel, how: str, delivery_id: str, who: As) -> None:
    unary(channel, f"/mq.Mq/{how}", mq_pb2.QueueId(id=delivery_id), Empty, who)


def publish_v2(channel: grpc.Channel, *messages: v2_pb2.OutboundMessage, who: As = WORKER) -> Any:
    request = v2_pb2.PublishRequest(messages=messages)
    return unary(channel, "/eventbus.v2.Publisher/Publish", request, v2_pb2.PublishResponse, who)


def pull(
    channel: grpc.Channel,
    queue: str,
    who: As = WORKER,
    wait: float = 0,
    topic: str = "",
    most: int = 100,
) -> list[v2_pb2.ReceivedMessage]:
    request = v2_pb2.PullRequest(queue=queue, topic=topic, max_messages=most, wait_seconds=wait)
    path = "/eventbus.v2.Subscriber/Pull"
    return list(unary(channel, path, request, v2_pb2.PullResponse, who).messages)


def pull_count(
    channel: grpc.Channel, queue: str, count: int, who: As = PEER
) -> list[v2_pb2.ReceivedMessage]:
    """Pulls until count messages came (a Pull hands out what is buffered after the first)."""
    got: list[v2_pb2.ReceivedMessage] = []
    for _ in range(count + 2):
        got += pull(channel, queue, who, wait=5, most=count - len(got))
        if len(got) >= count:
            break
    return got


def settle_v2(channel: grpc.Channel, method: str, ack_ids: list[str], who: As) -> list[str]:
    kinds = {
        "Acknowledge": (v2_pb2.AcknowledgeRequest, v2_pb2.AcknowledgeResponse, {}),
        "Nack": (v2_pb2.NackRequest, v2_pb2.NackResponse, {}),
        "ModifyAckDeadline": (
            v2_pb2.ModifyAckDeadlineRequest,
            v2_pb2.ModifyAckDeadlineResponse,
            {"ack_deadline_seconds": 60},
        ),
    }
    request_type, reply, fields = kinds[method]
    request = request_type(ack_ids=ack_ids, **fields)
    path = f"/eventbus.v2.Subscriber/{method}"
    return list(unary(channel, path, request, reply, who).invalid_ack_ids)


class Stream:
    """One StreamingPull with credentials: its requests wait until close()."""

    def __init__(self, channel: grpc.Channel, who: As, **first: Any) -> None:
        self._done = threading.Event()
        call = channel.stream_stream(
            "/eventbus.v2.Subscriber/StreamingPull",
            request_serializer=v2_pb2.StreamingPullRequest.SerializeToString,
            response_deserializer=v2_pb2.StreamingPullResponse.FromString,
        )
        self.call = call(self._requests(first), timeout=15, metadata=who.metadata())

    def _requests(self, first: dict[str, Any]) -> Iterator[v2_pb2.StreamingPullRequest]:
        yield v2_pb2.StreamingPullRequest(**first)
        self._done.wait(15)

    def first_messages(self) -> list[v2_pb2.ReceivedMessage]:
        for response in self.call:
            if response.messages:
                return list(response.messages)
        raise AssertionError("the stream ended without messages")

    def close(self) -> None:
        self._done.set()
        self.call.cancel()


def stream_outcome(channel: grpc.Channel, who: As, **first: Any) -> tuple[grpc.StatusCode, str]:
    stream = Stream(channel, who, **first)
    try:
        return outcome(stream.first_messages)
    finally:
        stream.close()


# The name-based calls: each with what it asks for, who may, and who may not


@dataclass(frozen=True)
class Call:
    path: str
    request: Callable[[str], Any]  # the request naming a queue (or topic)
    reply: Any
    permission: str  # publish, subscribe or admin
    allowed: As
    forbidden: As
    prefix: str = "orders"  # names the allowed identity's globs cover

    def __call__(self, channel: grpc.Channel, name: str, who: As) -> Any:
        return unary(channel, self.path, self.request(name), self.reply, who, timeout=10)


def _v2_message(name: str) -> v2_pb2.PublishRequest:
    return v2_pb2.PublishRequest(messages=[v2_pb2.OutboundMessage(queue=name, data=b"x")])


NAMED_CALLS = [
    Call(
        "/mq.Mq/publish",
        lambda q: mq_pb2.PublishRequest(queue=q, data="x"),
        Empty,
        "publish",
        WORKER,
        PEER,
    ),
    Call(
        "/mq.Mq/delayPublish",
        lambda q: mq_pb2.DelayPublishRequest(queue=q, data="x", delaySeconds=600),
        Empty,
        "publish",
        WORKER,
        PEER,
    ),
    Call(
        "/mq.Mq/subscribe",
        lambda q: mq_pb2.SubscribeRequest(queue=q),
        mq_pb2.SubscribeResponse,
        "subscribe",
        PEER,
        WRITER,
    ),
    Call(
        "/mq.MqTopic/publish",
        lambda t: mq_pb2.TopicPublishRequest(topic=t, data="x"),
        Empty,
        "publish",
        WORKER,
        PEER,
        "events",
    ),
    Call(
        "/mq.MqTopic/delayPublish",
        lambda t: mq_pb2.DelayTopicPublishRequest(topic=t, data="x", delaySeconds=600),
        Empty,
        "publish",
        WORKER,
        PEER,
        "events",
    ),
    Call(
        "/mq.MqTopic/subscribe",
        lambda g: mq_pb2.TopicSubscribeRequest(topic="events.all", queueName=g),
        mq_pb2.SubscribeResponse,
        "subscribe",
        PEER,
        WRITER,
        "group",
    ),
    Call(
        "/eventbus.v2.Publisher/Publish",
        _v2_message,
        v2_pb2.PublishResponse,
        "publish",
        WORKER,
        PEER,
    ),
    Call(
        "/eventbus.v2.Subscriber/Pull",
        lambda q: v2_pb2.PullRequest(queue=q, wait_seconds=0),
        v2_pb2.PullResponse,
        "subscribe",
        PEER,
        WRITER,
    ),
]
ADMIN_CALLS = [
    Call(
        "/eventbus.v2.Admin/GetQueue",
        lambda q: v2_pb2.GetQueueRequest(queue=q),
        v2_pb2.QueueInfo,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/ListQueues",
        lambda _: v2_pb2.ListQueuesRequest(),
        v2_pb2.ListQueuesResponse,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/ListDeadLetters",
        lambda q: v2_pb2.ListDeadLettersRequest(queue=q),
        v2_pb2.ListDeadLettersResponse,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/RequeueDeadLetters",
        lambda q: v2_pb2.RequeueDeadLettersRequest(queue=q),
        v2_pb2.RequeueDeadLettersResponse,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/ListDelayed",
        lambda q: v2_pb2.ListDelayedRequest(queue=q),
        v2_pb2.ListDelayedResponse,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/CancelDelayed",
        lambda _: v2_pb2.CancelDelayedRequest(message_ids=[str(uuid.uuid4())]),
        v2_pb2.CancelDelayedResponse,
        "admin",
        OPS,
        WORKER,
    ),
    Call(
        "/eventbus.v2.Admin/PurgeQueue",
        lambda q: v2_pb2.PurgeQueueRequest(queue=q),
        v2_pb2.PurgeQueueResponse,
        "admin",
        OPS,
        WORKER,
    ),
]
ALL_CALLS = NAMED_CALLS + ADMIN_CALLS


def call_id(call: Call) -> str:
    return call.path.strip("/")


def bind_group(channel: grpc.Channel, group: str) -> None:
    """A v1 subscribe of group binds it to events.all, then waits: its deadline passes."""
    request = mq_pb2.TopicSubscribeRequest(topic="events.all", queueName=group)
    path = "/mq.MqTopic/subscribe"
    waited = outcome(lambda: unary(channel, path, request, mq_pb2.SubscribeResponse, PEER, 1))
    assert waited[0] == grpc.StatusCode.DEADLINE_EXCEEDED


def create(channel: grpc.Channel, call: Call, name: str) -> None:
    """Make name exist as what call names: a queue, a topic or a bound group queue."""
    if call.prefix == "group":
        bind_group(channel, name)
    elif call.prefix == "events":
        request = mq_pb2.TopicPublishRequest(topic=name, data="x")
        unary(channel, "/mq.MqTopic/publish", request, Empty, WORKER)
    else:
        publish_v1(channel, name, "waiting")


@pytest.mark.parametrize("call", ALL_CALLS, ids=call_id)
def test_an_allowed_identity_is_served(channel: grpc.Channel, call: Call) -> None:
    name = unique(call.prefix)
    create(channel, call, name)  # a v1 subscribe finds a message; GetQueue a queue
    if call.path == "/mq.MqTopic/subscribe":
        request = mq_pb2.TopicPublishRequest(topic="events.all", data="to the group")
        unary(channel, "/mq.MqTopic/publish", request, Empty, WORKER)
    try:
        reply = call(channel, name, call.allowed)
    except grpc.RpcError as error:
        raise AssertionError(f"{error.code()}: {error.details()}") from None
    if call.path == "/mq.Mq/subscribe":
        assert reply.data == "waiting"
    elif call.path == "/mq.MqTopic/subscribe":
        assert reply.data == "to the group"
    elif call.path.endswith("/GetQueue"):
        assert reply.name == name
    elif call.path.endswith("/Publish"):
        assert len(reply.results) == 1 and reply.results[0].message_id


@pytest.mark.parametrize("call", ALL_CALLS, ids=call_id)
def test_a_forbidden_identity_is_refused_naming_the_permission_and_the_name(
    channel: grpc.Channel, call: Call
) -> None:
    admin = call.permission == "admin"
    name = unique(call.prefix if admin else "billing")  # outside every identity's globs
    callers = (call.forbidden, STRANGER) if admin else (call.allowed, call.forbidden, STRANGER)
    for who in callers:
        code, details = outcome(lambda who=who: call(channel, name, who))
        assert code == DENIED, (who, details)
        identity = who.identity
        if admin:
            assert details == f"identity {identity!r} lacks the admin permission"
            continue
        # v1 topic subscribe asks for the topic first, then the group queue
        topic_first = call.path == "/mq.MqTopic/subscribe" and who is not call.allowed
        target = "events.all" if topic_first else name
        assert details == (
            f"{'messages[0]: ' if 'Publisher' in call.path else ''}identity {identity!r} may "
            f"not {call.permission} {target!r} (auth.identities.{identity}.{call.permission})"
        )


@pytest.mark.parametrize("call", ALL_CALLS, ids=call_id)
@pytest.mark.parametrize("who", list(UNAUTHENTICATED_CALLERS), ids=str)
def test_a_caller_without_a_valid_token_is_unauthenticated(
    channel: grpc.Channel, call: Call, who: str
) -> None:
    code, details = outcome(
        lambda: call(channel, unique(call.prefix), UNAUTHENTICATED_CALLERS[who])
    )
    assert code == UNAUTHENTICATED
    wanted = {
        "no token": "this server needs a bearer token",
        "wrong token": "unknown token",
        "malformed": 'authorization metadata must be "Bearer <token>"',
    }[who]
    assert details == wanted


@pytest.mark.parametrize("call", ALL_CALLS, ids=call_id)
def test_a_refusal_does_not_tell_whether_the_queue_exists(
    channel: grpc.Channel, call: Call
) -> None:
    existing, absent = unique(call.prefix), unique(call.prefix)
    create(channel, call, existing)
    answers = []
    for name in (existing, absent):
        code, details = outcome(lambda name=name: call(channel, name, call.forbidden))
        answers.append((code, details.replace(name, "NAME")))
    assert answers[0] == answers[1]
    assert answers[0][0] == DENIED


def test_refused_publishes_store_nothing(channel: grpc.Channel) -> None:
    queue = unique("orders")
    for who in (PEER, STRANGER, NO_TOKEN, WRONG_TOKEN, MALFORMED):
        assert outcome(lambda who=who: publish_v1(channel, queue, "no", who))[0] != OK
        message = v2_pb2.OutboundMessage(queue=queue, data=b"no")
        assert outcome(lambda who=who, m=message: publish_v2(channel, m, who=who))[0] != OK
    publish_v1(channel, queue, "yes")
    assert [m.data for m in pull(channel, queue, PEER, wait=5)] == [b"yes"]


def test_a_batch_with_one_forbidden_target_is_refused_whole(channel: grpc.Channel) -> None:
    queue, forbidden = unique("orders"), unique("billing")
    batch = [
        v2_pb2.OutboundMessage(queue=queue, data=b"first"),
        v2_pb2.OutboundMessage(topic="events.x", data=b"topic"),
        v2_pb2.OutboundMessage(queue=forbidden, data=b"refused"),
        v2_pb2.OutboundMessage(queue=queue, data=b"last"),
    ]
    code, details = outcome(lambda: publish_v2(channel, *batch))
    assert code == DENIED
    assert details == (
        f"messages[2]: identity 'worker' may not publish {forbidden!r} "
        "(auth.identities.worker.publish)"
    )
    assert pull(channel, queue, PEER, wait=1) == []
    results = publish_v2(channel, batch[0], batch[1], batch[3]).results
    assert len(results) == 3
    assert sorted(m.data for m in pull_count(channel, queue, 2)) == [b"first", b"last"]


# Topic subscriptions read the topic and the group queue: both need subscribe


@pytest.mark.parametrize(
    ("who", "missing"), [("topic-only", "group"), ("group-only", "topic")], ids=str
)
def test_a_topic_subscription_needs_subscribe_on_the_topic_and_the_group(
    channel: grpc.Channel, who: str, missing: str
) -> None:
    topic, group = unique("events"), unique("group")
    refused = {"group": group, "topic": topic}[missing]
    caller = As(who)
    v1 = mq_pb2.TopicSubscribeRequest(topic=topic, queueName=group)
    attempts = {
        "v1": lambda: unary(channel, "/mq.MqTopic/subscribe", v1, mq_pb2.SubscribeResponse, caller),
        "Pull": lambda: pull(channel, group, caller, topic=topic),
        "StreamingPull": lambda: stream_outcome(channel, caller, queue=group, topic=topic),
    }
    for kind, attempt in attempts.items():
        if kind == "StreamingPull":
            code, details = attempt()
        else:
            code, details = outcome(attempt)
        assert code == DENIED, kind
        assert f"may not subscribe {refused!r}" in details, (kind, details)
    assert not queue_exists(channel, group)  # nothing was bound


def queue_exists(channel: grpc.Channel, queue: str) -> bool:
    request = v2_pb2.GetQueueRequest(queue=queue)
    path = "/eventbus.v2.Admin/GetQueue"
    code, details = outcome(lambda: unary(channel, path, request, v2_pb2.QueueInfo, OPS))
    assert code in (OK, grpc.StatusCode.NOT_FOUND), details
    return code == OK


def test_v2_topic_subscription_by_an_identity_with_both(channel: grpc.Channel) -> None:
    topic, group = unique("events"), unique("group")
    assert pull(channel, group, PEER, topic=topic) == []  # binds the group queue
    publish_v2(channel, v2_pb2.OutboundMessage(topic=topic, data=b"t"))
    got = pull(channel, group, PEER, wait=5, topic=topic)
    assert [m.data for m in got] == [b"t"]
    assert settle_v2(channel, "Acknowledge", [got[0].ack_id], PEER) == []


# StreamingPull


def test_streaming_pull_allowed_forbidden_and_unauthenticated(channel: grpc.Channel) -> None:
    queue = unique("orders")
    publish_v1(channel, queue, "streamed")
    stream = Stream(channel, PEER, queue=queue, ack_deadline_seconds=30)
    try:
        got = stream.first_messages()
        assert [m.data for m in got] == [b"streamed"]
        # a stream's ack id, settled by an identity that may not read its queue: invalid
        assert settle_v2(channel, "Acknowledge", [got[0].ack_id], STRANGER) == [got[0].ack_id]
        assert settle_v2(channel, "Acknowledge", [got[0].ack_id], PEER) == []
    finally:
        stream.close()
    code, details = stream_outcome(channel, WRITER, queue=queue)
    assert code == DENIED
    assert details == (
        f"identity 'writer' may not subscribe {queue!r} (auth.identities.writer.subscribe)"
    )
    for who, reason in (
        (NO_TOKEN, "this server needs a bearer token"),
        (WRONG_TOKEN, "unknown token"),
        (MALFORMED, 'authorization metadata must be "Bearer <token>"'),
    ):
        assert stream_outcome(channel, who, queue=queue) == (UNAUTHENTICATED, reason)
    absent = unique("orders")
    assert stream_outcome(channel, WRITER, queue=absent)[1].replace(absent, queue) == details


# Deliveries belong to the identity they were handed to


def test_v1_ack_and_nack_by_another_identity_are_refused_and_the_owner_still_acks(
    channel: grpc.Channel,
) -> None:
    queue = unique("orders")
    publish_v1(channel, queue, "mine")
    got = subscribe_v1(channel, queue, WORKER)
    for how in ("ack", "nack"):
        for who in (PEER, STRANGER):
            code, details = outcome(lambda how=how, who=who: settle_v1(channel, how, got.id, who))
            assert code == DENIED, (how, who)
            assert details == (
                f"identity {who.identity!r} may not ack, nack or extend delivery {got.id!r}: "
                "it was handed to another identity, and only that one may settle it"
            )
        for who in UNAUTHENTICATED_CALLERS.values():
            code, _ = outcome(lambda how=how, who=who: settle_v1(channel, how, got.id, who))
            assert code == UNAUTHENTICATED
    # the refused nacks put nothing back: the message stays handed out to worker
    assert pull(channel, queue, PEER, wait=1.5) == []
    settle_v1(channel, "ack", got.id, WORKER)
    publish_v1(channel, queue, "second")
    second = subscribe_v1(channel, queue, WORKER)
    settle_v1(channel, "nack", second.id, WORKER)  # its owner may nack
    again = subscribe_v1(channel, queue, PEER)
    assert again.data == "second"
    settle_v1(channel, "ack", again.id, PEER)


def test_mq_topic_ack_and_nack_follow_the_same_rule(channel: grpc.Channel) -> None:
    queue = unique("orders")
    publish_v1(channel, queue)
    got = subscribe_v1(channel, queue, PEER)
    ack = mq_pb2.QueueId(id=got.id)
    assert outcome(lambda: unary(channel, "/mq.MqTopic/nack", ack, Empty, WORKER))[0] == DENIED
    assert outcome(lambda: unary(channel, "/mq.MqTopic/ack", ack, Empty, NO_TOKEN))[0] == (
        UNAUTHENTICATED
    )
    assert outcome(lambda: unary(channel, "/mq.MqTopic/ack", ack, Empty, PEER)) == (OK, "")


@pytest.mark.parametrize("method", ["Acknowledge", "Nack", "ModifyAckDeadline"])
def test_v2_settling_another_identitys_delivery_makes_only_that_id_invalid(
    channel: grpc.Channel, method: str
) -> None:
    queue = unique("orders")
    publish_v2(channel, *(v2_pb2.OutboundMessage(queue=queue, data=b"%d" % i) for i in range(3)))
    mine = pull_count(channel, queue, 2, WORKER)
    theirs = pull_count(channel, queue, 1, PEER)
    assert len(mine) == 2 and len(theirs) == 1
    foreign = [m.ack_id for m in mine]
    batch = [theirs[0].ack_id, *foreign]
    assert settle_v2(channel, method, batch, PEER) == foreign
    assert settle_v2(channel, method, batch, STRANGER) == batch
    for who in UNAUTHENTICATED_CALLERS.values():
        assert outcome(lambda who=who: settle_v2(channel, method, batch, who))[0] == (
            UNAUTHENTICATED
        )
    # the owner's own ids are still its to settle
    assert settle_v2(channel, "Acknowledge", foreign, WORKER) == []


def test_v2_acknowledge_by_another_identity_leaves_the_delivery_open(
    channel: grpc.Channel,
) -> None:
    """A refused Nack must not bring the message back; the owner's ack then holds."""
    queue = unique("orders")
    publish_v2(channel, v2_pb2.OutboundMessage(queue=queue, data=b"held"))
    (got,) = pull(channel, queue, WORKER, wait=5)
    assert settle_v2(channel, "Nack", [got.ack_id], PEER) == [got.ack_id]
    assert pull(channel, queue, PEER, wait=1.5) == []
    assert settle_v2(channel, "Acknowledge", [got.ack_id], WORKER) == []


# grpclib clients pass tokens as a dict


async def grpclib_calls(port: int, queue: str) -> dict[str, Any]:
    channel = Channel("127.0.0.1", port)
    seen: dict[str, Any] = {}

    def auth(name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {TOKENS[name]}"}

    try:
        publisher, subscriber, mq = PublisherStub(channel), SubscriberStub(channel), MqStub(channel)
        request = v2_pb2.PublishRequest(messages=[v2_pb2.OutboundMessage(queue=queue, data=b"g")])
        await publisher.Publish(request, metadata=auth("worker"), timeout=10)
        await mq.publish(mq_pb2.PublishRequest(queue=queue, data="v1"), metadata=auth("worker"))
        pulled: list[bytes] = []
        for _ in range(3):
            reply = await subscriber.Pull(
                v2_pb2.PullRequest(queue=queue, max_messages=10, wait_seconds=5),
                metadata=auth("peer"),
                timeout=10,
            )
            pulled += [m.data for m in reply.messages]
            if len(pulled) == 2:
                break
        seen["pulled"] = sorted(pulled)
        for name, metadata in (
            ("forbidden", auth("peer")),
            ("none", None),
            ("wrong", {"authorization": "Bearer nope"}),
        ):
            try:
                await publisher.Publish(request, metadata=metadata, timeout=10)
                seen[name] = (Status.OK, "")
            except GRPCError as error:
                seen[name] = (error.status, error.message)
    finally:
        channel.close()
    return seen


def test_grpclib_passes_tokens_as_metadata(bus: DaemonProcess) -> None:
    queue = unique("orders")
    seen = asyncio.run(grpclib_calls(bus.grpc_port, queue))
    assert seen["pulled"] == [b"g", b"v1"]
    assert seen["forbidden"] == (
        Status.PERMISSION_DENIED,
        f"messages[0]: identity 'peer' may not publish {queue!r} (auth.identities.peer.publish)",
    )
    assert seen["none"] == (Status.UNAUTHENTICATED, "this server needs a bearer token")
    assert seen["wrong"] == (Status.UNAUTHENTICATED, "unknown token")


# Health and reflection need no token


def health(address: str) -> int:
    with grpc.insecure_channel(address) as opened:
        check = opened.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        return int(check(HealthCheckRequest(service="eventbus.v2.Publisher"), timeout=5).status)


def listed_services(address: str) -> set[str]:
    with grpc.insecure_channel(address) as opened:
        info = opened.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=ServerReflectionRequest.SerializeToString,
            response_deserializer=ServerReflectionResponse.FromString,
        )
        replies = list(info(iter([ServerReflectionRequest(list_services="")]), timeout=5))
    return {s.name for s in replies[0].list_services_response.service}


def test_health_and_reflection_answer_without_a_token(bus: DaemonProcess) -> None:
    assert health(bus.grpc_address) == HealthCheckResponse.SERVING
    assert {"mq.Mq", "eventbus.v2.Publisher", "eventbus.v2.Admin"} <= listed_services(
        bus.grpc_address
    )


# Refusals are counted and logged, at most a line a minute of a kind


def metrics(bus: DaemonProcess, who: As = OPS) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{bus.http_port}/metrics")
    for key, value in who.metadata():
        request.add_header(key, value)
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


def refusals(text: str, method: str, code: str) -> float:
    pattern = re.compile(r"^eventbus_auth_refusals_total\{(.*)\} (\S+)$", re.MULTILINE)
    for labels, value in pattern.findall(text):
        if f'method="{method}"' in labels and f'code="{code}"' in labels:
            return float(value)
    return 0.0


def audit_lines(bus: DaemonProcess, *parts: str) -> list[str]:
    return [
        line
        for line in bus.log.splitlines()
        if "eventbus.audit" in line and all(part in line for part in parts)
    ]


def test_refusals_are_counted_and_logged_once_a_minute(
    bus: DaemonProcess, channel: grpc.Channel
) -> None:
    noisy = As("noisy")
    method = "mq.Mq/publish"
    before = metrics(bus)
    unauthenticated_before = len(audit_lines(bus, "a caller", f"{method} refused"))
    for _ in range(5):
        assert outcome(lambda: publish_v1(channel, unique("orders"), who=noisy))[0] == DENIED
        assert outcome(lambda: publish_v1(channel, unique("orders"), who=WRONG_TOKEN))[0] == (
            UNAUTHENTICATED
        )
    after = metrics(bus)
    assert (
        refusals(after, method, "PERMISSION_DENIED") - refusals(before, method, "PERMISSION_DENIED")
        == 5
    )
    assert (
        refusals(after, method, "UNAUTHENTICATED") - refusals(before, method, "UNAUTHENTICATED")
        == 5
    )
    denied = audit_lines(bus, "auth: identity noisy from 127.0.0.1:", f"{method} refused")
    assert len(denied) == 1, denied
    assert "may not publish" in denied[0] and "WARNING" in denied[0]
    unauthenticated = audit_lines(bus, "a caller", f"{method} refused")
    assert 1 <= len(unauthenticated) <= unauthenticated_before + 1
    assert all(token not in bus.log for token in TOKENS.values())
    assert WRONG_TOKEN.header is not None and WRONG_TOKEN.header[7:] not in bus.log


def admin_actions(text: str, method: str, identity: str) -> float:
    pattern = re.compile(r"^eventbus_admin_actions_total\{(.*)\} (\S+)$", re.MULTILINE)
    for labels, value in pattern.findall(text):
        if f'method="{method}"' in labels and f'identity="{identity}"' in labels:
            return float(value)
    return 0.0


def test_admin_actions_are_counted_and_logged(bus: DaemonProcess, channel: grpc.Channel) -> None:
    """Each is counted, and logged with who did what to which queue."""
    method = "eventbus.v2.Admin/PurgeQueue"
    before = admin_actions(metrics(bus), method, "ops")
    queue = unique("orders")
    publish_v1(channel, queue)
    request = v2_pb2.PurgeQueueRequest(queue=queue)
    unary(channel, f"/{method}", request, v2_pb2.PurgeQueueResponse, OPS)
    assert admin_actions(metrics(bus), method, "ops") == before + 1
    lines = audit_lines(bus, "admin: identity ops from 127.0.0.1:", f"{method} on {queue}")
    assert len(lines) == 1, lines
    purge = channel.unary_unary(
        f"/{method}",
        request_serializer=v2_pb2.PurgeQueueRequest.SerializeToString,
        response_deserializer=v2_pb2.PurgeQueueResponse.FromString,
    )
    assert outcome(lambda: purge(request, metadata=WORKER.metadata()))[0] == DENIED
    assert admin_actions(metrics(bus), method, "worker") == 0  # refused: no action


def test_the_metrics_page_needs_an_admin_token(bus: DaemonProcess) -> None:
    for who, code in ((NO_TOKEN, 401), (WORKER, 403)):
        with pytest.raises(urllib.error.HTTPError) as caught:
            metrics(bus, who)
        assert caught.value.code == code
    assert "auth.mode is off" not in bus.log


# auth.mode "off"


def test_auth_off_serves_everyone_as_before_and_warns_on_an_open_address(
    make_daemon: Any,
) -> None:
    daemon = make_daemon(server={"grpc_host": "0.0.0.0", "reflection": False})
    daemon.wait_ready()
    warnings = [line for line in daemon.log.splitlines() if "auth.mode is off" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert f"0.0.0.0: anyone who reaches port {daemon.grpc_port}" in warnings[0]
    queue = unique("anything")
    with grpc.insecure_channel(daemon.grpc_address) as opened:
        publish_v1(opened, queue, "open", NO_TOKEN)
        got = subscribe_v1(opened, queue, As(header="Bearer ignored"))
        assert got.data == "open"
        settle_v1(opened, "ack", got.id, NO_TOKEN)
        info = unary(
            opened,
            "/eventbus.v2.Admin/GetQueue",
            v2_pb2.GetQueueRequest(queue=queue),
            v2_pb2.QueueInfo,
            NO_TOKEN,
        )
        assert info.name == queue
    assert health(daemon.grpc_address) == HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        listed_services(daemon.grpc_address)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert daemon.http_get("/metrics")[0] == 200


def test_auth_off_on_loopback_does_not_warn(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    assert "auth.mode is off" not in daemon.log
