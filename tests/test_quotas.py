"""Quotas per identity: the token bucket and the waiting-pull counter on a fake clock, then
publish rates and waiting pulls against a real daemon with token identities."""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from google.rpc import error_details_pb2, status_pb2
from grpclib.const import Status

from eventbus._generated import mq_pb2, v2_pb2
from eventbus.config import IdentityConfig
from eventbus.errors import InvalidArgument
from eventbus.ops.metrics import Metrics, label_values
from eventbus.security.access import NOBODY, Identity
from eventbus.security.quotas import (
    QuotaExceeded,
    Quotas,
    TokenBucket,
    burst_of,
    carried,
    retry_hint,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def quotas_of(clock: FakeClock, *identities: Identity) -> Quotas:
    return Quotas(identities, Metrics("n"), clock)


def refusals(quotas: Quotas) -> dict[str, float]:
    return label_values(quotas._metrics.quota_refusals)  # type: ignore[union-attr]


# --- the bucket ---------------------------------------------------------------------------------


def test_burst_defaults_to_one_seconds_worth() -> None:
    assert burst_of(10, 0) == 10
    assert burst_of(2.5, 0) == 3
    assert burst_of(0.2, 0) == 1
    assert burst_of(10, 4) == 4


def test_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=4, burst=8, tokens=0.0, updated=0.0)
    bucket.refill(0.5)
    assert bucket.tokens == 2.0
    bucket.refill(1.25)
    assert bucket.tokens == 5.0
    bucket.refill(100.0)
    assert bucket.tokens == 8.0


def test_bucket_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=4, burst=8, tokens=1.0, updated=10.0)
    bucket.refill(9.0)
    assert (bucket.tokens, bucket.updated) == (1.0, 10.0)


def test_take_is_all_or_nothing_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=4, burst=8, tokens=8.0, updated=0.0)
    assert bucket.take(5, 0.0) == 0.0
    assert bucket.tokens == 3.0
    assert bucket.take(5, 0.0) == 0.5  # 2 missing at 4/s
    assert bucket.tokens == 3.0  # nothing taken
    assert bucket.take(5, 0.25) == 0.25
    assert bucket.take(5, 0.5) == 0.0
    assert bucket.tokens == 0.0


def test_more_than_the_burst_never_passes() -> None:
    bucket = TokenBucket(rate=4, burst=8, tokens=8.0, updated=0.0)
    assert bucket.take(9, 1000.0) == math.inf
    assert bucket.tokens == 8.0
    assert bucket.take(8, 1000.0) == 0.0


def test_floating_point_dust_does_not_refuse_a_token_that_is_there() -> None:
    bucket = TokenBucket(rate=10, burst=1, tokens=0.0, updated=0.0)
    now = 0.0
    for _ in range(10):
        now += 0.1  # ten steps of 0.1 do not add up to 1.0 exactly
        bucket.refill(now)
    assert bucket.take(1, now) == 0.0


def test_retry_hint_rounds_up_to_hundredths() -> None:
    assert retry_hint(0.341) == pytest.approx(0.35)
    assert retry_hint(0.35) == pytest.approx(0.35)
    assert retry_hint(0.0001) == pytest.approx(0.01)
    assert retry_hint(2.0) == pytest.approx(2.0)


def test_a_reload_keeps_the_tokens_left_and_gives_no_fresh_burst() -> None:
    old = TokenBucket(rate=1, burst=10, tokens=2.0, updated=0.0)
    same = carried(old, Identity("a", publish_rate=1, publish_burst=10), 3.0)
    assert (same.tokens, same.burst) == (5.0, 10)
    smaller = carried(same, Identity("a", publish_rate=1, publish_burst=3), 3.0)
    assert (smaller.tokens, smaller.burst) == (3.0, 3)
    assert carried(None, Identity("a", publish_rate=2), 3.0).tokens == 2.0


# --- Quotas: publishing -------------------------------------------------------------------------


def test_publish_past_the_rate_is_resource_exhausted_with_when_to_retry(clock: FakeClock) -> None:
    alice = Identity("alice", publish_rate=2, publish_burst=3)
    quotas = quotas_of(clock, alice)
    for _ in range(3):
        quotas.publish(alice)
    with pytest.raises(QuotaExceeded) as refused:
        quotas.publish(alice)
    error = refused.value
    assert error.status is Status.RESOURCE_EXHAUSTED
    assert "auth.identities.alice.publish_rate" in (error.message or "")
    assert "retry in 0.50 s" in (error.message or "")
    [info] = error.details
    assert isinstance(info, error_details_pb2.RetryInfo)
    assert info.retry_delay.ToNanoseconds() == 500_000_000
    assert refusals(quotas) == {"alice/publish_rate": 1.0}
    clock.now += 0.5
    quotas.publish(alice)


def test_a_batch_takes_a_token_per_message_or_none(clock: FakeClock) -> None:
    alice = Identity("alice", publish_rate=1, publish_burst=5)
    quotas = quotas_of(clock, alice)
    quotas.publish(alice, 3)
    with pytest.raises(QuotaExceeded, match=r"retry in 1\.00 s"):
        quotas.publish(alice, 3)  # 2 left: one missing
    quotas.publish(alice, 2)  # the refused batch took nothing
    with pytest.raises(QuotaExceeded):
        quotas.publish(alice)


def test_a_batch_over_the_burst_is_invalid_argument(clock: FakeClock) -> None:
    alice = Identity("alice", publish_rate=1, publish_burst=5)
    quotas = quotas_of(clock, alice)
    with pytest.raises(InvalidArgument, match=r"auth\.identities\.alice\.publish_burst"):
        quotas.publish(alice, 6)
    quotas.publish(alice, 5)
    assert refusals(quotas) == {"alice/publish_burst": 1.0}


def test_identities_have_buckets_of_their_own(clock: FakeClock) -> None:
    alice = Identity("alice", publish_rate=1, publish_burst=1)
    bob = Identity("bob", publish_rate=1, publish_burst=1)
    quotas = quotas_of(clock, alice, bob, Identity("carol"))
    quotas.publish(alice)
    with pytest.raises(QuotaExceeded):
        quotas.publish(alice)
    quotas.publish(bob)
    for _ in range(1000):  # no publish_rate: no limit
        quotas.publish(Identity("carol"))
        quotas.publish(NOBODY)


def test_update_drops_removed_identities_and_applies_new_rates(clock: FakeClock) -> None:
    alice = Identity("alice", publish_rate=1, publish_burst=2)
    quotas = quotas_of(clock, alice, Identity("bob", publish_rate=1))
    quotas.publish(alice, 2)
    with pytest.raises(QuotaExceeded):
        quotas.publish(alice)
    assert quotas.tracked() == {"alice", "bob"}
    faster = Identity("alice", publish_rate=100, publish_burst=2)
    quotas.update([faster])
    assert quotas.tracked() == {"alice"}
    assert refusals(quotas) == {"alice/publish_rate": 1.0}
    with pytest.raises(QuotaExceeded, match=r"retry in 0\.01 s"):  # still empty, now 100/s
        quotas.publish(faster)
    quotas.update([])
    assert quotas.tracked() == set() and refusals(quotas) == {}
    quotas.publish(faster, 1000)  # an identity no longer configured has no quota


def test_quotas_take_identity_configs(clock: FakeClock) -> None:
    config = IdentityConfig("alice", publish_rate=1.0, publish_burst=1, max_waiting_pulls=1)
    quotas = Quotas([config], clock=clock)
    quotas.publish(Identity("alice"))
    with pytest.raises(QuotaExceeded):
        quotas.publish(Identity("alice"))


# --- Quotas: waiting pulls ----------------------------------------------------------------------


def test_waiting_pulls_past_the_limit_are_refused(clock: FakeClock) -> None:
    alice = Identity("alice", max_waiting_pulls=2)
    quotas = quotas_of(clock, alice)
    with quotas.waiting_pull(alice), quotas.waiting_pull(alice):
        assert quotas.waiting("alice") == 2
        with pytest.raises(QuotaExceeded) as refused, quotas.waiting_pull(alice):
            pass
        assert "auth.identities.alice.max_waiting_pulls" in (refused.value.message or "")
        assert "retry in 1.00 s" in (refused.value.message or "")
        assert quotas.waiting("alice") == 2
    assert quotas.waiting("alice") == 0 and quotas.tracked() == set()
    with quotas.waiting_pull(alice):
        pass
    assert refusals(quotas) == {"alice/max_waiting_pulls": 1.0}


def test_a_pull_that_fails_gives_its_slot_back(clock: FakeClock) -> None:
    alice = Identity("alice", max_waiting_pulls=1)
    quotas = quotas_of(clock, alice)
    with pytest.raises(RuntimeError), quotas.waiting_pull(alice):
        raise RuntimeError("the pull failed")
    with quotas.waiting_pull(alice):
        assert quotas.waiting("alice") == 1


def test_each_identity_counts_its_own_pulls(clock: FakeClock) -> None:
    alice = Identity("alice", max_waiting_pulls=1)
    bob = Identity("bob", max_waiting_pulls=1)
    quotas = quotas_of(clock, alice, bob)
    with quotas.waiting_pull(alice), quotas.waiting_pull(bob), quotas.waiting_pull(NOBODY):
        assert (quotas.waiting("alice"), quotas.waiting("bob")) == (1, 1)


def test_pulls_waiting_across_a_reload_stay_counted_until_they_end(clock: FakeClock) -> None:
    alice = Identity("alice", max_waiting_pulls=1)
    quotas = quotas_of(clock, alice)
    with quotas.waiting_pull(alice):
        quotas.update([Identity("alice", max_waiting_pulls=2)])
        with quotas.waiting_pull(alice), pytest.raises(QuotaExceeded), quotas.waiting_pull(alice):
            pass
        quotas.update([])  # alice removed while her pull waits
        assert quotas.waiting("alice") == 1
    assert quotas.tracked() == set()


# --- against a real daemon ----------------------------------------------------------------------

TOKENS = {"alice": "alice-token", "bob": "bob-token", "carol": "carol-token", "ops": "ops-token"}


def identity_table(name: str, **keys: Any) -> dict[str, Any]:
    digest = hashlib.sha256(TOKENS[name].encode()).hexdigest()
    return {"token_sha256": digest, "publish": ["*"], "subscribe": ["*"], **keys}


def auth_sections(**identities: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections = {f"auth.identities.{name}": table for name, table in identities.items()}
    return {"auth": {"mode": "token"}, **sections}


class Caller:
    """grpcio calls with one identity's token."""

    def __init__(self, address: str, name: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.metadata = (("authorization", f"Bearer {TOKENS[name]}"),)

    def call(self, path: str, request: Any, reply: Any, timeout: float = 10) -> Any:
        method = self.channel.unary_unary(
            path, request_serializer=type(request).SerializeToString, response_deserializer=reply
        )
        return method(request, timeout=timeout, metadata=self.metadata)

    def publish(self, queue: str, data: str) -> None:
        self.call("/mq.Mq/publish", mq_pb2.PublishRequest(queue=queue, data=data), Empty.FromString)

    def subscribe(self, queue: str, timeout: float = 10) -> mq_pb2.SubscribeResponse:
        request = mq_pb2.SubscribeRequest(queue=queue)
        reply: mq_pb2.SubscribeResponse = self.call(
            "/mq.Mq/subscribe", request, mq_pb2.SubscribeResponse.FromString, timeout
        )
        return reply

    def publish_v2(self, queue: str, *data: bytes) -> None:
        messages = [v2_pb2.OutboundMessage(queue=queue, data=d) for d in data]
        request = v2_pb2.PublishRequest(messages=messages)
        self.call("/eventbus.v2.Publisher/Publish", request, v2_pb2.PublishResponse.FromString)

    def pull(self, queue: str, most: int = 10, wait: float = 0) -> list[bytes]:
        request = v2_pb2.PullRequest(queue=queue, max_messages=most, wait_seconds=wait)
        reply = self.call("/eventbus.v2.Subscriber/Pull", request, v2_pb2.PullResponse.FromString)
        return [message.data for message in reply.messages]

    def stream(self, queue: str) -> Iterator[v2_pb2.StreamingPullResponse]:
        """A StreamingPull kept open until the returned iterator is cancelled."""
        method = self.channel.stream_stream(
            "/eventbus.v2.Subscriber/StreamingPull",
            request_serializer=v2_pb2.StreamingPullRequest.SerializeToString,
            response_deserializer=v2_pb2.StreamingPullResponse.FromString,
        )
        opened = threading.Event()

        def requests() -> Iterator[v2_pb2.StreamingPullRequest]:
            yield v2_pb2.StreamingPullRequest(queue=queue)
            opened.wait()  # never half-closes

        call = method(requests(), metadata=self.metadata)
        call.add_done_callback(lambda _: opened.set())
        return call  # type: ignore[no-any-return]

    def close(self) -> None:
        self.channel.close()


def refused(call: Any, *args: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args)
    return caught.value


def retry_after(error: grpc.RpcError) -> float:
    """The seconds the message says to wait ("retry in 0.35 s")."""
    found = re.search(r"retry in (\d+\.\d+) s", error.details() or "")
    assert found, error.details()
    return float(found.group(1))


def metrics_text(daemon: Any) -> str:
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}/metrics",
        headers={"Authorization": f"Bearer {TOKENS['ops']}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def in_flight(daemon: Any) -> float:
    found = re.search(r"^eventbus_grpc_in_flight (\S+)$", metrics_text(daemon), re.MULTILINE)
    assert found
    return float(found.group(1))


def wait_in_flight(daemon: Any, calls: int, timeout: float = 10) -> None:
    """Wait until the daemon handles calls gRPC calls, then a moment for them to get going."""
    deadline = time.monotonic() + timeout
    while in_flight(daemon) < calls:
        assert time.monotonic() < deadline, "the call never reached the daemon"
        time.sleep(0.05)
    time.sleep(0.3)


@pytest.fixture
def callers(make_daemon: Any) -> Iterator[tuple[Any, dict[str, Caller]]]:
    daemon = make_daemon(
        **auth_sections(
            alice=identity_table("alice", publish_rate=0.5, publish_burst=3),
            bob=identity_table("bob", publish_rate=0.5, publish_burst=3),
            carol=identity_table("carol", max_waiting_pulls=1),
            ops=identity_table("ops", admin=True),
        )
    )
    daemon.wait_ready()
    clients = {name: Caller(daemon.grpc_address, name) for name in TOKENS}
    yield daemon, clients
    for client in clients.values():
        client.close()


def test_v1_publish_past_the_rate_waits_as_told(callers: Any) -> None:
    daemon, clients = callers
    alice, bob = clients["alice"], clients["bob"]
    for i in range(3):
        alice.publish("quota.v1", f"m{i}")
    error = refused(alice.publish, "quota.v1", "m3")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "auth.identities.alice.publish_rate" in (error.details() or "")
    wait = retry_after(error)
    assert 0 < wait <= 2.0  # one token at 0.5/s
    bob.publish("quota.v1", "from bob")  # bob's bucket is his own
    time.sleep(wait)
    alice.publish("quota.v1", "m3")
    assert (
        'eventbus_quota_refusals_total{identity="alice",quota="publish_rate"} 1.0'
        in metrics_text(daemon)
    )


def test_resource_exhausted_carries_retry_info(callers: Any) -> None:
    _, clients = callers
    alice = clients["alice"]
    for i in range(3):
        alice.publish("quota.info", f"m{i}")
    error = refused(alice.publish, "quota.info", "m3")
    trailers = dict(error.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToNanoseconds() == pytest.approx(retry_after(error) * 1e9)


def test_v2_batch_over_the_tokens_left_is_refused_whole(callers: Any) -> None:
    _, clients = callers
    alice = clients["alice"]
    alice.publish_v2("quota.v2", b"a0", b"a1")
    error = refused(alice.publish_v2, "quota.v2", b"b0", b"b1")  # one token left
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_after(error) > 0
    error = refused(alice.publish_v2, "quota.v2", b"c0", b"c1", b"c2", b"c3")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "auth.identities.alice.publish_burst" in (error.details() or "")
    alice.publish_v2("quota.v2", b"d0")  # the token left: the refused batches took none
    received: list[bytes] = []
    while pulled := alice.pull("quota.v2", wait=1):
        received += pulled
    assert sorted(received) == [b"a0", b"a1", b"d0"]


def test_a_second_waiting_subscribe_is_refused_until_the_first_returns(callers: Any) -> None:
    daemon, clients = callers
    carol = clients["carol"]
    first: list[Any] = []
    waiting = threading.Thread(target=lambda: first.append(carol.subscribe("quota.pull")))
    waiting.start()
    wait_in_flight(daemon, 1)
    error = refused(carol.subscribe, "quota.pull", 5)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "auth.identities.carol.max_waiting_pulls" in (error.details() or "")
    assert retry_after(error) > 0
    carol.publish("quota.pull", "one")
    waiting.join(10)
    assert [reply.data for reply in first] == ["one"]
    carol.publish("quota.pull", "two")
    assert carol.subscribe("quota.pull").data == "two"
    assert 'identity="carol",quota="max_waiting_pulls"} 1.0' in metrics_text(daemon)


def test_an_open_stream_is_one_waiting_pull(callers: Any) -> None:
    daemon, clients = callers
    carol = clients["carol"]
    stream = carol.stream("quota.stream")
    wait_in_flight(daemon, 1)
    error = refused(carol.pull, "quota.stream")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    bob_waits = clients["bob"].pull("quota.stream")  # another identity is not counted
    assert bob_waits == []
    stream.cancel()
    deadline = time.monotonic() + 10
    while in_flight(daemon) > 0:
        assert time.monotonic() < deadline, "the stream never closed"
        time.sleep(0.05)
    assert carol.pull("quota.stream") == []
