"""The v2 contract from other clients than grpcio: grpclib (asyncio, the generated v2_grpc
stubs; plainly and from trio through trio-asyncio) and @grpc/grpc-js (Node, the .proto loaded
at run time): a publish, a StreamingPull, acks on the stream and a refusal."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from eventbus._generated import v2_pb2
from eventbus._generated.v2_grpc import PublisherStub, SubscriberStub
from tests.servers import unique_name
from tests.v2_client import V2Client
from tests.v2_support import daemon, quick

__all__ = ["daemon"]  # fixture

HERE = Path(__file__).parent
ALL_BYTES = bytes(range(256))


async def grpclib_round_trip(port: int, queue: str) -> dict[str, Any]:
    """Publish two messages, receive them on a stream, ack one there and one by Acknowledge;
    then a second stream must stay empty; and a refused batch."""
    channel = Channel("127.0.0.1", port)
    try:
        publisher, subscriber = PublisherStub(channel), SubscriberStub(channel)
        reply = await publisher.Publish(
            v2_pb2.PublishRequest(
                messages=[
                    v2_pb2.OutboundMessage(queue=queue, data=ALL_BYTES, attributes={"a": "✓"}),
                    v2_pb2.OutboundMessage(queue=queue, data=b"two"),
                ]
            ),
            timeout=10,
        )
        got = await _receive_and_ack(subscriber, queue, 2)
        after = await _quiet(subscriber, queue, 1.0)
        try:
            await publisher.Publish(v2_pb2.PublishRequest(), timeout=10)
            refused = None
        except GRPCError as error:
            refused = (error.status, error.message)
        return {"results": list(reply.results), "got": got, "after": after, "refused": refused}
    finally:
        channel.close()


async def _receive_and_ack(
    subscriber: SubscriberStub, queue: str, count: int
) -> list[v2_pb2.ReceivedMessage]:
    got: list[v2_pb2.ReceivedMessage] = []
    async with subscriber.StreamingPull.open(timeout=10) as stream:
        first = v2_pb2.StreamingPullRequest(queue=queue, ack_deadline_seconds=30)
        await stream.send_message(first)
        while len(got) < count:
            response = await stream.recv_message()
            assert response is not None
            got += response.messages
        await stream.send_message(v2_pb2.StreamingPullRequest(ack_ids=[got[0].ack_id]))
        acknowledged = await subscriber.Acknowledge(
            v2_pb2.AcknowledgeRequest(ack_ids=[got[1].ack_id]), timeout=10
        )
        assert list(acknowledged.invalid_ack_ids) == []
        await stream.end()
        assert await stream.recv_message() is None  # the server ends the stream
    return got


async def _quiet(subscriber: SubscriberStub, queue: str, seconds: float) -> int:
    """How many messages a new stream receives within seconds."""
    got = 0
    async with subscriber.StreamingPull.open() as stream:
        await stream.send_message(v2_pb2.StreamingPullRequest(queue=queue))
        try:
            async with asyncio.timeout(seconds):
                while (response := await stream.recv_message()) is not None:
                    got += len(response.messages)
        except TimeoutError:
            await stream.cancel()
    return got


def check_round_trip(outcome: dict[str, Any], queue: str) -> None:
    results, got = outcome["results"], outcome["got"]
    assert [m.message_id for m in got] == [r.message_id for r in results]
    assert [m.data for m in got] == [ALL_BYTES, b"two"]
    assert [dict(m.attributes) for m in got] == [{"a": "✓"}, {}]
    assert {(m.queue, m.attempt) for m in got} == {(queue, 1)}
    assert outcome["after"] == 0
    status, details = outcome["refused"]
    assert status == Status.INVALID_ARGUMENT and "messages" in details


def test_grpclib_from_asyncio(daemon: Any) -> None:
    queue = unique_name("grpclib")
    check_round_trip(asyncio.run(grpclib_round_trip(daemon.grpc_port, queue)), queue)


async def test_grpclib_from_trio_through_trio_asyncio(daemon: Any) -> None:
    queue = unique_name("grpclib-trio")
    async with trio_asyncio.open_loop():
        with trio.fail_after(20):
            outcome = await trio_asyncio.aio_as_trio(grpclib_round_trip)(daemon.grpc_port, queue)
    check_round_trip(outcome, queue)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_grpc_js_client(make_daemon: Any) -> None:
    if not (HERE / "node" / "node_modules" / "@grpc" / "proto-loader").exists():
        pytest.fail("run `make test` (it installs tests/node with npm ci)")
    node = make_daemon(**quick())
    node.wait_ready()
    queue = unique_name("node")
    result = subprocess.run(
        ["node", str(HERE / "node" / "client_v2.js"), node.grpc_address, queue],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    results, received = reply["results"], reply["received"]
    assert [r["duplicate"] for r in results] == [False, False, True]
    assert results[2]["message_id"] == results[1]["message_id"]
    assert [m["message_id"] for m in received] == [r["message_id"] for r in results[:2]]
    assert [bytes.fromhex(m["data"]) for m in received] == [ALL_BYTES, b"second"]
    assert received[0]["attributes"] == {"kind": "node ✓", "empty": ""}
    assert {(m["queue"], m["attempt"]) for m in received} == {(queue, 1)}
    assert all(m["publish_time"] > 0 for m in received)
    assert reply["invalid"] == [] and reply["after"] == 0
    assert reply["refused"]["code"] == 3 and "messages[0]" in reply["refused"]["details"]
    # The stream's acks held: nothing is left for another client either.
    v2 = V2Client(node.grpc_address)
    assert v2.stream(queue).quiet_for(0.5) == []
    assert v2.acknowledge([m["ack_id"] for m in received]) == [m["ack_id"] for m in received]
    v2.close()
