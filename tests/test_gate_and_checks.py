"""The gRPC gate's draining and the readiness checks, on trio's mock clock with fakes."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from grpclib.const import Status

from eventbus.api.http import CHECK_TIMEOUT, check_readiness
from eventbus.api.rpc import Gate
from eventbus.ops.metrics import Metrics
from eventbus.ops.notify import Notifier


async def test_drain_waits_for_calls_in_flight(autojump_clock: trio.testing.MockClock) -> None:
    gate = Gate(Metrics("n"))
    gate._enter()
    finished_at: list[float] = []

    async def finish_call_later() -> None:
        await trio.sleep(3)
        gate._leave("mq.Mq/publish", Status.OK)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_call_later)
        left = await gate.drain(grace=10)
        finished_at.append(trio.current_time())
    assert left == 0 and gate.draining
    assert finished_at == [pytest.approx(3)]


async def test_drain_gives_up_after_grace(autojump_clock: trio.testing.MockClock) -> None:
    gate = Gate(Metrics("n"))
    gate._enter()
    gate._enter()
    assert await gate.drain(grace=5) == 2
    assert trio.current_time() == pytest.approx(5)


async def test_drain_with_nothing_in_flight_is_immediate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = Gate(Metrics("n"))
    assert await gate.drain(grace=5) == 0
    assert trio.current_time() == 0


async def test_readiness_names_what_is_down(autojump_clock: trio.testing.MockClock) -> None:
    async def up() -> None:
        await trio.sleep(0.1)

    async def refused() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    async def silent() -> None:
        await trio.sleep_forever()

    readiness = await check_readiness({"rabbitmq": up, "postgresql": refused, "redis": silent})
    assert readiness.down == {
        "postgresql": "ConnectionRefusedError: [Errno 111] Connection refused",
        "redis": "timed out",
    }
    assert trio.current_time() == pytest.approx(CHECK_TIMEOUT)


def test_watchdog_interval_from_environment() -> None:
    assert Notifier({"WATCHDOG_USEC": "4000000"}).watchdog_interval == 4.0
    assert Notifier({}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).enabled
