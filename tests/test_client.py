"""The Python client (eventbus.client) against a real daemon: the v1 calls, batch publishing,
the streaming subscriber (acks, nacks, lease extension, graceful stop, reconnection across a
daemon restart), the unary v2 calls; on asyncio and from trio through trio-asyncio."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import pytest
import trio
import trio_asyncio
from grpclib.const import Status

from eventbus.client import Client, Message, OutboundMessage, ReceivedMessage, RpcError
from tests.daemon_process import auth_table
from tests.servers import unique_name

T = TypeVar("T")

# A nack comes back at once; delayed messages are looked at five times a second.
QUICK: dict[str, dict[str, Any]] = {
    "delivery": {"nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
}


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    started = make_daemon(**QUICK)
    started.wait_ready()
    return started


def run(daemon: Any, scenario: Callable[[Client], Awaitable[T]], timeout: float = 60) -> T:
    """Run a scenario on a plain asyncio loop with a client of the daemon."""

    async def main() -> T:
        async with Client(daemon.grpc_address, timeout=10) as client:
            return await asyncio.wait_for(scenario(client), timeout)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


class Seen(Generic[T]):
    """What handlers saw, in order; `await seen.until(n)` waits until n items are there."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._added = asyncio.Event()

    def add(self, item: T) -> None:
        self.items.append(item)
        self._added.set()

    async def until(self, count: int) -> None:
        while len(self.items) < count:
            self._added.clear()
            await self._added.wait()

    async def until_seen(self, item: T) -> None:
        while item not in self.items:
            self._added.clear()
            await self._added.wait()


async def pull_all(client: Client, queue: str, count: int) -> list[ReceivedMessage]:
    """Pull until count messages came (each pull returns what is ready once one is)."""
    pulled: list[ReceivedMessage] = []
    while len(pulled) < count:
        more = await client.pull(queue, max_messages=count - len(pulled), wait_seconds=5)
        assert more, f"{len(pulled)} of {count} messages came"
        pulled += more
    return pulled


# ---- v1 --------------------------------------------------------------------------------------


def test_v1_publish_subscribe_ack_nack_and_delay(daemon: Any) -> None:
    queue = unique_name("c1")

    async def scenario(client: Client) -> None:
        await client.v1.publish(queue, "first")
        got = await client.v1.subscribe(queue, wait_seconds=10)
        assert got is not None and (got.data, got.queue) == ("first", queue)
        await client.v1.nack(got.id)
        again = await client.v1.subscribe(queue, wait_seconds=10)
        assert again is not None and again.data == "first" and again.id != got.id
        await client.v1.ack(again.id)
        await client.v1.delay_publish(queue, "later", delay_seconds=1)
        assert await client.v1.subscribe(queue, wait_seconds=0.5) is None  # not due yet
        later = await client.v1.subscribe(queue, wait_seconds=10)
        assert later is not None and later.data == "later"
        await client.v1.ack(later.id)
        with pytest.raises(RpcError) as raised:
            await client.v1.publish("", "no queue")
        assert raised.value.status == Status.INVALID_ARGUMENT

    run(daemon, scenario)


def test_v1_topics(daemon: Any) -> None:
    topic, group = unique_name("ct"), unique_name("cg")

    async def scenario(client: Client) -> None:
        assert await client.v1.topic_subscribe(topic, group, wait_seconds=0.5) is None  # binds
        await client.v1.topic_publish(topic, "to all")
        got = await client.v1.topic_subscribe(topic, group, wait_seconds=10)
        assert got is not None and (got.data, got.queue) == ("to all", group)
        await client.v1.topic_nack(got.id)
        again = await client.v1.topic_subscribe(topic, group, wait_seconds=10)
        assert again is not None and again.data == "to all"
        await client.v1.topic_ack(again.id)
        await client.v1.topic_delay_publish(topic, "later", delay_seconds=1)
        later = await client.v1.topic_subscribe(topic, group, wait_seconds=10)
        assert later is not None and later.data == "later"
        await client.v1.topic_ack(later.id)

    run(daemon, scenario)


# ---- v2 --------------------------------------------------------------------------------------


def test_batched_publish_then_pull_and_the_unary_settlements(daemon: Any) -> None:
    queue = unique_name("c2")

    async def scenario(client: Client) -> None:
        async with client.publisher(max_messages=50) as publisher:
            futures = [
                publisher.publish(queue=queue, data=b"%d" % i, attributes={"n": str(i)})
                for i in range(120)
            ]
        ids = [future.result() for future in futures]
        assert len(set(ids)) == 120
        pulled = await pull_all(client, queue, 120)
        assert sorted(m.message_id for m in pulled) == sorted(ids)
        assert all(m.attributes["n"] == m.data.decode() and m.attempt == 1 for m in pulled)
        first, *rest = pulled
        assert await client.nack([first.ack_id]) == []
        assert await client.acknowledge([m.ack_id for m in rest] + ["not-an-id"]) == ["not-an-id"]
        (back,) = await client.pull(queue, wait_seconds=10)
        assert (back.message_id, back.attempt) == (first.message_id, 2)
        await client.acknowledge([back.ack_id])
        assert await client.pull(queue, wait_seconds=0.5) == []

    run(daemon, scenario)


def test_publish_batch_reports_duplicates_and_refuses_invalid_batches(daemon: Any) -> None:
    queue = unique_name("c2")

    async def scenario(client: Client) -> None:
        once = OutboundMessage(b"once", queue=queue, dedup_id="order-1")
        first, second = await client.publish_batch([once, once])
        assert (first.duplicate, second.duplicate) == (False, True)
        assert second.message_id == first.message_id
        with pytest.raises(RpcError) as raised:
            await client.publish_batch([OutboundMessage(b"x", queue="amq.refused")])
        assert raised.value.status == Status.INVALID_ARGUMENT

    run(daemon, scenario)


def test_the_subscriber_acks_handled_messages_and_a_nacked_one_comes_back(daemon: Any) -> None:
    queue = unique_name("c3")
    handled: Seen[tuple[bytes, int]] = Seen()
    modified: list[list[str]] = []

    async def scenario(client: Client) -> list[str]:
        async def handle(message: Message) -> None:
            if message.data == b"a":  # a stream's ack id, through a unary call
                modified.append(await client.modify_ack_deadline([message.ack_id], 30))
            handled.add((message.data, message.attempt))
            if message.data == b"fails once" and message.attempt == 1:
                raise RuntimeError("not this time")

        datas = [b"a", b"b", b"fails once", b"c"]
        await client.publish_batch([OutboundMessage(d, queue=queue) for d in datas])
        async with client.subscribe(queue, handle, max_outstanding_messages=2):
            await handled.until(5)
        return [m.message_id for m in await client.pull(queue, wait_seconds=1)]

    left = run(daemon, scenario)
    assert sorted(handled.items) == [
        (b"a", 1),
        (b"b", 1),
        (b"c", 1),
        (b"fails once", 1),
        (b"fails once", 2),
    ]
    assert modified == [[]]
    assert left == []  # every ack reached the bus before the stream ended


def test_a_slow_handler_keeps_its_message_by_lease_extension(daemon: Any) -> None:
    queue = unique_name("c4")
    attempts: Seen[int] = Seen()

    async def handle(message: Message) -> None:
        attempts.add(message.attempt)
        await asyncio.sleep(3.5)  # three and a half one-second deadlines

    async def scenario(client: Client) -> None:
        await client.publish_batch([OutboundMessage(b"slow", queue=queue)])
        async with client.subscribe(queue, handle, ack_deadline_seconds=1):
            await attempts.until(1)
            await asyncio.sleep(4)
        assert await client.pull(queue, wait_seconds=1) == []

    run(daemon, scenario)
    assert attempts.items == [1]  # never handed out again while it ran


def test_stop_finishes_running_handlers_and_gives_back_the_rest_at_once(daemon: Any) -> None:
    queue = unique_name("c5")
    started: Seen[str] = Seen()

    async def handle(message: Message) -> None:
        started.add(message.message_id)
        await asyncio.sleep(0.5)

    async def scenario(client: Client) -> tuple[list[str], list[str]]:
        await client.publish_batch([OutboundMessage(b"%d" % i, queue=queue) for i in range(6)])
        subscription = client.subscribe(queue, handle, max_outstanding_messages=2)
        await started.until(2)
        await subscription.stop(grace=10)
        rest = await pull_all(client, queue, 4)
        await client.acknowledge([m.ack_id for m in rest])
        assert await client.pull(queue, wait_seconds=0.5) == []
        return list(started.items), [m.message_id for m in rest]

    handled, rest = run(daemon, scenario)
    assert len(handled) == 2  # the running two finished and were acked: not among the rest
    assert len(set(handled) | set(rest)) == 6


@pytest.mark.slow
def test_the_subscriber_comes_back_after_the_daemon_restarts(make_daemon: Any) -> None:
    first = make_daemon(**QUICK)
    first.wait_ready()
    port = first.grpc_port
    queue = unique_name("c6")
    handled: Seen[bytes] = Seen()

    async def handle(message: Message) -> None:
        handled.add(message.data)

    async def scenario(client: Client) -> None:
        async with client.subscribe(queue, handle, retry_max_seconds=0.5):
            await client.publish_batch([OutboundMessage(b"before", queue=queue)])
            await handled.until(1)
            assert await asyncio.to_thread(first.stop) == 0
            second = make_daemon(**QUICK, server={"grpc_port": port})
            await asyncio.to_thread(second.wait_ready)
            await client.publish_batch([OutboundMessage(b"after", queue=queue)])
            await handled.until_seen(b"after")
        # "before" may come twice: its ack may not have reached the first daemon before it stopped
        assert set(handled.items) == {b"before", b"after"}

    run(first, scenario, timeout=90)


# ---- from trio -------------------------------------------------------------------------------


async def test_from_trio_through_trio_asyncio(daemon: Any) -> None:
    queue = unique_name("c7")
    handled: Seen[bytes] = Seen()

    async def handle(message: Message) -> None:
        handled.add(message.data)

    async def scenario() -> str | None:
        async with Client(daemon.grpc_address, timeout=10) as client:
            async with client.publisher() as publisher:
                await publisher.publish(queue=queue, data=b"from trio")
            async with client.subscribe(queue, handle):
                await handled.until(1)
            await client.v1.publish(queue, "v1 from trio")
            got = await client.v1.subscribe(queue, wait_seconds=10)
            assert got is not None
            await client.v1.ack(got.id)
            return got.data

    async with trio_asyncio.open_loop():
        with trio.fail_after(60):
            v1_data = await trio_asyncio.aio_as_trio(scenario)()
    assert handled.items == [b"from trio"]
    assert v1_data == "v1 from trio"


def test_a_token_goes_with_every_call_of_the_client(make_daemon: Any) -> None:
    token = secrets.token_urlsafe(32)
    identity = {
        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
        "publish": ["*"],
        "subscribe": ["*"],
    }
    daemon = make_daemon(auth=auth_table("token", app=identity), **QUICK)
    daemon.wait_ready()
    queue = unique_name("tok")

    async def main() -> None:
        async with Client(daemon.grpc_address, timeout=10) as anonymous:
            with pytest.raises(RpcError) as refused:
                await anonymous.v1.publish(queue, "x")
            assert refused.value.status is Status.UNAUTHENTICATED
        async with Client(daemon.grpc_address, timeout=10, token=token) as client:
            await client.v1.publish(queue, "one")
            [result] = await client.publish_batch([OutboundMessage(queue=queue, data=b"two")])
            assert result.message_id
            pulled = await pull_all(client, queue, 2)
            assert sorted(m.data for m in pulled) == [b"one", b"two"]
            assert await client.acknowledge([m.ack_id for m in pulled]) == []
            client.close()  # a channel opened again carries the token too
            assert await client.pull(queue, wait_seconds=0.2) == []

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
