"""The Python client's own logic (eventbus.client) against an in-memory fake of the v2 services
(tests/fake_bus.py): batching, results in order, failed batches, flow control, ack and nack,
lease extension, reconnection, graceful stop; on plain asyncio and from trio through
trio-asyncio. The pure parts (backoff, leases, pending settlements, targets) without a server.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio_asyncio
from grpclib.const import Status
from grpclib.exceptions import ProtocolError

from eventbus._generated import v2_pb2
from eventbus.client import Client, Message, OutboundMessage, PublishError, RpcError
from eventbus.client.channel import parse_target
from eventbus.client.errors import as_rpc_error
from eventbus.client.leases import Leases, Pending
from eventbus.client.retry import backoff_delay, is_retryable
from tests.fake_bus import FakeBus, serving

Scenario = Callable[[FakeBus, Client], Awaitable[None]]


def run(scenario: Scenario, timeout: float = 20) -> FakeBus:
    """Run a scenario on a plain asyncio loop, with a fake served and a client connected to it;
    returns the fake for the test to read."""
    fake = FakeBus()

    async def main() -> None:
        async with serving(fake) as target, Client(target, timeout=5) as client:
            await asyncio.wait_for(scenario(fake, client), timeout)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
    return fake


def datas(batch: list[v2_pb2.OutboundMessage]) -> list[bytes]:
    return [message.data for message in batch]


# ---- the batching publisher ------------------------------------------------------------------


def test_a_batch_leaves_when_it_holds_max_messages() -> None:
    ids: list[str] = []

    async def scenario(fake: FakeBus, client: Client) -> None:
        publisher = client.publisher(max_messages=3, max_latency=60)
        futures = [publisher.publish(queue="q", data=b"%d" % i) for i in range(7)]
        await asyncio.gather(*futures[:6])  # two full batches, sent without waiting
        assert not futures[6].done()
        await publisher.flush()
        ids.extend(future.result() for future in futures)

    fake = run(scenario)
    assert [datas(batch) for batch in fake.batches] == [
        [b"0", b"1", b"2"],
        [b"3", b"4", b"5"],
        [b"6"],
    ]
    assert ids == [f"id-{i}" for i in range(7)]  # each future has its own message's id


def test_a_batch_leaves_before_it_would_pass_max_bytes() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        async with client.publisher(max_bytes=100, max_latency=60) as publisher:
            for i in range(5):
                publisher.publish(queue="q", data=b"%d" % i + b"." * 39)

    fake = run(scenario)
    assert [len(batch) for batch in fake.batches] == [2, 2, 1]
    assert all(sum(m.ByteSize() for m in batch) <= 100 for batch in fake.batches)


def test_a_message_over_max_bytes_leaves_alone() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        async with client.publisher(max_bytes=100, max_latency=60) as publisher:
            publisher.publish(queue="q", data=b"small")
            big = publisher.publish(queue="q", data=b"b" * 200)
            publisher.publish(queue="q", data=b"after")
        assert big.result() == "id-" + "b" * 200

    fake = run(scenario)
    assert [len(batch) for batch in fake.batches] == [1, 1, 1]


def test_a_batch_leaves_max_latency_after_its_first_message() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        publisher = client.publisher(max_messages=100, max_latency=0.02)
        futures = [publisher.publish(topic="t", data=b"%d" % i) for i in range(3)]
        assert await asyncio.gather(*futures) == ["id-0", "id-1", "id-2"]  # no flush called

    fake = run(scenario)
    assert [datas(batch) for batch in fake.batches] == [[b"0", b"1", b"2"]]
    assert fake.batches[0][0].topic == "t"


def test_a_failed_batch_fails_each_of_its_futures_with_the_status() -> None:
    def refuse(request: v2_pb2.PublishRequest) -> Status | None:
        bad = any(m.data == b"bad" for m in request.messages)
        return Status.INVALID_ARGUMENT if bad else None

    async def scenario(fake: FakeBus, client: Client) -> None:
        fake.refuse = refuse
        publisher = client.publisher(max_messages=2, max_latency=60)
        futures = [publisher.publish(queue="q", data=d) for d in (b"a", b"bad", b"c", b"d")]
        done = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(error, PublishError) for error in done[:2])
        assert {error.status for error in done[:2]} == {Status.INVALID_ARGUMENT}  # type: ignore[union-attr]
        assert done[2:] == ["id-c", "id-d"]

    run(scenario)


def test_no_more_batches_in_flight_than_allowed() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        fake.hold_publish = asyncio.Event()
        publisher = client.publisher(max_messages=1, max_batches_in_flight=2)
        futures = [publisher.publish(queue="q", data=b"%d" % i) for i in range(5)]
        await fake.wait_for(lambda: fake.publishing == 2)
        await asyncio.sleep(0.05)  # room for a third call, were one allowed
        assert len(fake.batches) == 2
        fake.hold_publish.set()
        assert await asyncio.gather(*futures) == [f"id-{i}" for i in range(5)]

    fake = run(scenario)
    assert fake.most_publishing == 2
    assert len(fake.batches) == 5


def test_a_closed_publisher_refuses_messages_and_invalid_ones_are_refused_at_once() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        publisher = client.publisher()
        with pytest.raises(ValueError, match="exactly one of queue and topic"):
            publisher.publish(queue="q", topic="t", data=b"x")
        with pytest.raises(TypeError, match="bytes"):
            publisher.publish(queue="q", data="text")  # type: ignore[arg-type]
        pending = publisher.publish(queue="q", data=b"last")
        await publisher.aclose()
        assert pending.result() == "id-last"  # flushed on close
        with pytest.raises(RuntimeError, match="closed"):
            publisher.publish(queue="q", data=b"x")

    run(scenario)


def test_publish_batch_returns_results_in_request_order() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        messages = [OutboundMessage(b"%d" % i, queue="q", dedup_id=str(i)) for i in range(4)]
        results = await client.publish_batch(messages)
        assert [result.message_id for result in results] == [f"id-{i}" for i in range(4)]
        fake.refuse = lambda request: Status.UNAVAILABLE
        with pytest.raises(RpcError) as raised:
            await client.publish_batch(messages)
        assert raised.value.status == Status.UNAVAILABLE

    fake = run(scenario)
    assert [m.dedup_id for m in fake.batches[0]] == ["0", "1", "2", "3"]


# ---- the subscriber --------------------------------------------------------------------------


def test_handlers_never_exceed_max_outstanding_messages() -> None:
    running: list[int] = [0, 0]  # now, most
    release = asyncio.Event()

    async def handle(message: Message) -> None:
        running[0] += 1
        running[1] = max(running[1], running[0])
        await release.wait()
        running[0] -= 1

    async def scenario(fake: FakeBus, client: Client) -> None:
        fake.ignore_flow_control = True  # the client must hold the bound by itself
        await fake.deliver(*(b"%d" % i for i in range(10)))
        subscription = client.subscribe("q", handle, max_outstanding_messages=3)
        await fake.wait_for(lambda: not fake.ready)
        await asyncio.sleep(0.05)  # room for more handlers to start, were any allowed
        assert running == [3, 3]
        release.set()
        await fake.wait_for(lambda: len(fake.acked()) == 10)
        await subscription.stop()

    fake = run(scenario)
    assert running[1] == 3
    assert fake.streams[0].first.max_outstanding_messages == 3


def test_ack_when_the_handler_returns_nack_when_it_raises_or_asks() -> None:
    async def handle(message: Message) -> None:
        if message.data == b"raise":
            raise ValueError("cannot handle this one")
        if message.data == b"nack":
            message.nack()

    async def scenario(fake: FakeBus, client: Client) -> None:
        await fake.deliver(b"fine", b"raise", b"nack")
        async with client.subscribe("q", handle):
            await fake.wait_for(lambda: len(fake.events) == 3)

    fake = run(scenario)
    assert fake.acked() == ["a1"]
    assert sorted(fake.nacked()) == ["a2", "a3"]


def test_received_message_fields() -> None:
    seen: list[Message] = []

    async def handle(message: Message) -> None:
        seen.append(message)

    async def scenario(fake: FakeBus, client: Client) -> None:
        stamp = v2_pb2.ReceivedMessage(
            ack_id="x1", message_id="m1", data=b"d", attributes={"k": "v"}, attempt=2, queue="q"
        )
        stamp.publish_time.FromSeconds(1_700_000_000)
        fake.ready.append(stamp)
        async with client.subscribe("q", handle, topic="t"):
            await fake.wait_for(lambda: bool(fake.acked()))

    fake = run(scenario)
    (message,) = seen
    assert (message.message_id, message.data, message.attributes) == ("m1", b"d", {"k": "v"})
    assert (message.attempt, message.queue, message.settled) == (2, "q", True)
    assert message.publish_time is not None and message.publish_time.timestamp() == 1_700_000_000
    assert message.deadline is None
    assert (fake.streams[0].first.queue, fake.streams[0].first.topic) == ("q", "t")


def test_deadlines_are_extended_while_a_slow_handler_runs() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        async def handle(message: Message) -> None:
            await fake.wait_for(lambda: len(fake.extensions) >= 2)

        await fake.deliver(b"slow")
        async with client.subscribe("q", handle, ack_deadline_seconds=1):
            await fake.wait_for(lambda: bool(fake.acked()))

    fake = run(scenario)
    assert fake.extensions[:2] == [("a1", 1), ("a1", 1)]
    # extended while it ran, acked once it returned
    assert fake.events == [("extend", "a1"), ("extend", "a1"), ("ack", "a1"), ("end", "1")]
    assert fake.streams[0].first.ack_deadline_seconds == 1


def test_a_broken_stream_is_opened_again_and_its_acks_dropped() -> None:
    handled: list[str] = []

    async def scenario(fake: FakeBus, client: Client) -> None:
        first_done = asyncio.Event()

        async def handle(message: Message) -> None:
            handled.append(message.ack_id)
            if message.attempt == 1:
                await first_done.wait()  # still running when its stream breaks

        await fake.deliver(b"x")
        subscription = client.subscribe("q", handle, retry_initial_seconds=0.01)
        await fake.wait_for(lambda: bool(fake.streams) and bool(fake.streams[0].unacked))
        fake.streams[0].broken.set()
        await fake.wait_for(lambda: len(fake.acked()) == 1)  # the redelivery, on stream 2
        first_done.set()  # the first handler returns: its ack has no stream to go to
        await subscription.stop()

    fake = run(scenario)
    assert len(fake.streams) == 2
    assert handled == ["a1", "a2"]
    assert fake.acked() == ["a2"]


def test_a_stream_the_server_ends_is_opened_again() -> None:
    async def handle(message: Message) -> None:
        pass

    async def scenario(fake: FakeBus, client: Client) -> None:
        async with client.subscribe("q", handle, retry_initial_seconds=0.01):
            await fake.wait_for(lambda: bool(fake.streams))
            fake.streams[0].finished.set()  # as a daemon does when it shuts down
            await fake.wait_for(lambda: len(fake.streams) == 2)
            await fake.deliver(b"x")
            await fake.wait_for(lambda: bool(fake.acked()))

    fake = run(scenario)
    assert fake.acked() == ["a1"]


def test_a_status_that_retrying_cannot_fix_ends_the_subscription() -> None:
    async def handle(message: Message) -> None:
        raise AssertionError("no message expected")

    async def scenario(fake: FakeBus, client: Client) -> None:
        fake.refuse_streams = Status.INVALID_ARGUMENT
        subscription = client.subscribe("q", handle, retry_initial_seconds=0.01)
        with pytest.raises(RpcError) as raised:
            await subscription.wait()
        assert raised.value.status == Status.INVALID_ARGUMENT
        assert not subscription.running

    run(scenario)


def test_stop_lets_handlers_finish_and_flushes_their_acks_before_ending_the_stream() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        release, started = asyncio.Event(), asyncio.Event()
        handled: list[bytes] = []

        async def handle(message: Message) -> None:
            handled.append(message.data)
            started.set()
            await release.wait()

        await fake.deliver(b"running")
        subscription = client.subscribe("q", handle)
        await started.wait()
        stopping = asyncio.get_running_loop().create_task(subscription.stop(grace=10))
        await asyncio.sleep(0.02)
        await fake.deliver(b"late")  # sent on the stream while stopping: never handled
        await fake.wait_for(lambda: not fake.ready)
        await asyncio.sleep(0.02)
        assert not stopping.done()  # waiting for the running handler
        release.set()
        await stopping
        assert handled == [b"running"]
        await fake.wait_for(lambda: bool(fake.ready))

    fake = run(scenario)
    assert fake.events == [("ack", "a1"), ("end", "1")]
    assert [m.data for m in fake.ready] == [b"late"]  # back at once when the stream ended


def test_stop_cancels_handlers_still_running_after_the_grace_period() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        async def handle(message: Message) -> None:
            await asyncio.Event().wait()

        await fake.deliver(b"stuck")
        subscription = client.subscribe("q", handle)
        await fake.wait_for(lambda: bool(fake.streams) and not fake.ready)
        await subscription.stop(grace=0.05)
        await fake.wait_for(lambda: bool(fake.ready))

    fake = run(scenario)
    assert fake.events == [("end", "1")]
    assert fake.ready[0].data == b"stuck"


def test_closing_the_client_cancels_its_subscriptions() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handle(message: Message) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def scenario(fake: FakeBus, client: Client) -> None:
        await fake.deliver(b"held")
        subscription = client.subscribe("q", handle)
        await started.wait()
        client.close()
        await subscription.wait()
        assert cancelled.is_set() and not subscription.running
        await fake.wait_for(lambda: bool(fake.ready))  # the broken stream gave it back

    fake = run(scenario)
    assert fake.acked() == [] and fake.ready[0].data == b"held"


def test_pull_acknowledge_nack_and_modify_ack_deadline() -> None:
    async def scenario(fake: FakeBus, client: Client) -> None:
        await fake.deliver(b"1", b"2", b"3")
        pulled = await client.pull("q", max_messages=2, wait_seconds=0.5)
        assert [m.data for m in pulled] == [b"1", b"2"]
        assert await client.modify_ack_deadline(["a1"], 30) == []
        assert await client.acknowledge(["a1", "bogus"]) == ["bogus"]
        assert await client.nack(["a2"], delay_seconds=5) == []

    fake = run(scenario)
    assert fake.events == [("ack", "a1"), ("ack", "bogus"), ("nack", "a2")]
    assert fake.extensions == [("a1", 30)]


def test_a_call_to_nothing_listening_is_unavailable() -> None:
    async def main() -> None:
        async with Client(f"127.0.0.1:{free_port()}", timeout=5) as client:
            with pytest.raises(RpcError) as raised:
                await client.publish_batch([OutboundMessage(b"x", queue="q")])
            assert raised.value.status == Status.UNAVAILABLE

    from tests.servers import free_port

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())


# ---- from trio, through trio-asyncio ---------------------------------------------------------


async def test_publish_and_subscribe_from_trio_through_trio_asyncio() -> None:
    fake = FakeBus()
    received: list[bytes] = []

    async def handle(message: Message) -> None:
        received.append(message.data)

    async def scenario() -> list[str]:
        async with serving(fake) as target, Client(target, timeout=5) as client:
            async with client.publisher(max_latency=0.005) as publisher:
                ids = await asyncio.gather(
                    *(publisher.publish(queue="q", data=d) for d in (b"a", b"b"))
                )
            await fake.deliver(b"x", b"y")
            async with client.subscribe("q", handle):
                await fake.wait_for(lambda: len(fake.acked()) == 2)
            return list(ids)

    async with trio_asyncio.open_loop():
        with trio.fail_after(20):
            ids = await trio_asyncio.aio_as_trio(scenario)()
    assert ids == ["id-a", "id-b"]
    assert received == [b"x", b"y"]
    assert fake.events == [("ack", "a1"), ("ack", "a2"), ("end", "1")]


# ---- pure parts ------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap_with_jitter_taking_at_most_half() -> None:
    rng = random.Random(7)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (8, 10.0), (200, 10.0)]:
        delays = [backoff_delay(failures, 0.1, 10.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not one value


def test_which_statuses_are_retried() -> None:
    assert is_retryable(Status.UNAVAILABLE) and is_retryable(Status.INTERNAL)
    assert is_retryable(Status.RESOURCE_EXHAUSTED) and is_retryable(Status.DEADLINE_EXCEEDED)
    assert not is_retryable(Status.INVALID_ARGUMENT) and not is_retryable(Status.UNIMPLEMENTED)
    assert not is_retryable(Status.PERMISSION_DENIED) and not is_retryable(Status.NOT_FOUND)


def test_leases_are_extended_at_two_thirds_of_the_deadline_until_the_maximum() -> None:
    leases = Leases(deadline=30, max_lease=50)
    leases.add("a", now=0)
    leases.add("b", now=5)
    assert leases.next_due() == 20
    assert leases.take_due(19) == []
    assert leases.take_due(20) == ["a"]
    assert leases.next_due() == 25  # b, then a again at 40
    assert leases.take_due(40) == ["b", "a"]
    leases.remove("b")
    assert leases.take_due(60) == []  # a is past its 50 s maximum: left to run out
    assert len(leases) == 0 and leases.next_due() is None


def test_pending_settlements_leave_in_one_request() -> None:
    pending = Pending()
    assert pending.take(60) is None
    pending.acks += ["a1", "a2"]
    pending.nacks.append("a3")
    pending.extensions += ["a1", "a4"]
    request = pending.take(60)
    assert request is not None and len(pending) == 0
    assert list(request.ack_ids) == ["a1", "a2"] and list(request.nack_ids) == ["a3"]
    assert list(request.modify_deadline_ack_ids) == ["a4"]  # a1 is acked in the same request
    assert list(request.modify_deadline_seconds) == [60]


def test_targets() -> None:
    assert parse_target("127.0.0.1:9091") == ("127.0.0.1", 9091, None)
    assert parse_target("bus.internal:443") == ("bus.internal", 443, None)
    assert parse_target("[::1]:9091") == ("::1", 9091, None)
    assert parse_target("unix:///run/eventbus.sock") == (None, None, "/run/eventbus.sock")
    assert parse_target("unix:relative.sock") == (None, None, "relative.sock")
    for bad in ("localhost", "host:port", "host:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_target(bad)


def test_a_stream_grpclib_cannot_end_cleanly_is_unavailable_and_retried() -> None:
    error = as_rpc_error(ProtocolError("Outgoing stream was not ended"))
    assert error is not None and error.status == Status.UNAVAILABLE
    assert is_retryable(error.status)
