"""Clients of other stacks, each doing publish, subscribe and ack against a real daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from grpclib.client import Channel

from eventbus._generated import mq_grpc, mq_pb2

HERE = Path(__file__).resolve().parent


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    started = make_daemon()
    started.wait_ready()
    return started


def check_round_trip(received: list[dict[str, str]], queue: str, expected: list[str]) -> None:
    assert [r["data"] for r in received] == expected
    assert {r["queue"] for r in received} == {queue}
    assert len({r["id"] for r in received}) == len(expected)


def test_grpcio_client_generated_from_its_own_copy_of_the_contract(daemon: Any) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / "contract" / "grpcio_client.py"),
            daemon.grpc_address,
            "grpcio-q",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    received = json.loads(result.stdout)["received"]
    check_round_trip(received, "grpcio-q", [f"grpcio {i}" for i in range(5)])


async def test_grpclib_client(daemon: Any) -> None:
    from eventbus.backends import aio

    async def round_trip() -> list[dict[str, str]]:
        channel = Channel("127.0.0.1", daemon.grpc_port)
        stub = mq_grpc.MqStub(channel)
        try:
            for i in range(5):
                await stub.publish(mq_pb2.PublishRequest(queue="grpclib-q", data=f"grpclib {i}"))
            received = []
            for _ in range(5):
                reply = await stub.subscribe(mq_pb2.SubscribeRequest(queue="grpclib-q"), timeout=10)
                await stub.ack(mq_pb2.QueueId(id=reply.id))
                received.append({"id": reply.id, "data": reply.data, "queue": reply.queue})
            return received
        finally:
            channel.close()

    async with aio.open_loop(lambda: None):
        with trio.fail_after(60):
            received = await aio.call(round_trip)
    check_round_trip(received, "grpclib-q", [f"grpclib {i}" for i in range(5)])


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_grpc_js_client(daemon: Any) -> None:
    if not (HERE / "node" / "node_modules" / "@grpc" / "grpc-js").exists():
        pytest.fail("run `make test` (it installs tests/node with npm ci)")
    result = subprocess.run(
        ["node", str(HERE / "node" / "client.js"), daemon.grpc_address, "node-q", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    check_round_trip(reply["received"], "node-q", [f"node {i} ✓" for i in range(5)])
    assert reply["invalid"] == 3  # INVALID_ARGUMENT
