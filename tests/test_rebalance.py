"""Rebalancing between two real daemons, and its decisions as plain functions."""

from __future__ import annotations

import time
from typing import Any

from eventbus.delivery.rebalance import (
    ANNOUNCE_EVERY,
    RELEASE_EVERY,
    STARVING_AFTER,
    QueueState,
    should_release,
    starving,
)
from tests.bus_client import BusClient


def test_starving_needs_an_empty_buffer_and_a_long_enough_wait() -> None:
    now = 100.0
    states = [
        QueueState("waited-long", 0, now - STARVING_AFTER),
        QueueState("just-started", 0, now - STARVING_AFTER / 2),
        QueueState("has-messages", 3, now - 10),
        QueueState("nobody-waits", 0, None),
    ]
    assert starving(states, now, {}) == ["waited-long"]


def test_starving_is_announced_at_most_once_per_interval() -> None:
    state = [QueueState("q", 0, 0.0)]
    assert starving(state, 10.0, {"q": 10.0 - ANNOUNCE_EVERY / 2}) == []
    assert starving(state, 10.0, {"q": 10.0 - ANNOUNCE_EVERY}) == ["q"]


def test_release_only_idle_prefetched_messages_and_not_too_often() -> None:
    now = 50.0
    assert should_release(QueueState("q", 5, None), now, {})
    assert not should_release(QueueState("q", 0, None), now, {})  # nothing held
    assert not should_release(QueueState("q", 5, now - 3), now, {})  # wanted here
    assert not should_release(QueueState("q", 5, None, handing_out=True), now, {})
    assert not should_release(None, now, {})  # not consumed here
    assert not should_release(QueueState("q", 5, None), now, {"q": now - RELEASE_EVERY / 2})
    assert should_release(QueueState("q", 5, None), now, {"q": now - RELEASE_EVERY})


def test_a_starving_node_gets_messages_another_node_prefetched(make_daemon: Any) -> None:
    holder = make_daemon()
    starving_node = make_daemon()
    holder.wait_ready()
    starving_node.wait_ready()
    first, second = BusClient(holder.grpc_address), BusClient(starving_node.grpc_address)
    assert first.try_subscribe("shared-work", timeout=0.5) is None  # holder starts consuming
    for i in range(20):
        first.publish("shared-work", f"w{i}")  # all land in the holder's prefetch buffer
    time.sleep(0.5)

    asked = time.monotonic()
    reply = second.subscribe("shared-work", timeout=15)
    assert time.monotonic() - asked < 6  # a couple of seconds, not the 5-minute hold time
    second.ack(reply.id)
    got = {reply.data}
    while (more := second.try_subscribe("shared-work", timeout=2)) is not None:
        second.ack(more.id)
        got.add(more.data)
    assert len(got) >= 10  # the holder handed its buffer over, not just one message
    assert "handing" in holder.log and "prefetched messages to node1" in holder.log
