"""The consumer's local buffer: asyncio-side takers, plain-call producers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from eventbus.delivery.consumer import Buffer, Buffered


def item(name: str, received_at: float = 0.0) -> Buffered:
    return Buffered(message=name, received_at=received_at)  # type: ignore[arg-type]


def label(buffered: Buffered) -> str:
    return str(buffered.message)


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())


def test_take_waits_until_an_item_is_put() -> None:
    async def scenario() -> tuple[str, float]:
        buffer = Buffer()
        loop = asyncio.get_running_loop()
        started = loop.time()
        loop.call_later(0.2, buffer.put, item("late"))
        got = await buffer.take()
        return label(got), loop.time() - started

    name, waited = run(scenario)
    assert name == "late" and waited >= 0.19


def test_first_in_first_out_and_put_back_goes_first() -> None:
    async def scenario() -> list[str]:
        buffer = Buffer()
        for name in "abc":
            buffer.put(item(name))
        first = await buffer.take()
        buffer.put_back(first)
        return [label(await buffer.take()) for _ in range(3)]

    assert run(scenario) == ["a", "b", "c"]


def test_each_put_goes_to_one_waiting_taker_in_order() -> None:
    async def scenario() -> tuple[int, list[str], int]:
        buffer = Buffer()
        takers = [asyncio.create_task(buffer.take()) for _ in range(3)]
        await asyncio.sleep(0)
        waiting = buffer.waiting
        for name in "xyz":
            buffer.put(item(name))
        return waiting, [label(t) for t in await asyncio.gather(*takers)], len(buffer)

    waiting, got, left = run(scenario)
    assert (waiting, got, left) == (3, ["x", "y", "z"], 0)


def test_a_cancelled_taker_loses_nothing() -> None:
    async def scenario() -> tuple[int, str]:
        buffer = Buffer()
        leaving = asyncio.create_task(buffer.take())
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        waiting = buffer.waiting
        buffer.put(item("kept"))
        return waiting, label(await buffer.take())

    assert run(scenario) == (0, "kept")


def test_an_item_handed_to_a_taker_that_is_cancelled_is_put_back_first() -> None:
    async def scenario() -> list[str]:
        buffer = Buffer()
        buffer_owner = asyncio.create_task(buffer.take())
        await asyncio.sleep(0)
        buffer.put(item("handed"))  # the waiter's future now holds it...
        buffer_owner.cancel()  # ...but the taker is cancelled before it runs again
        await asyncio.gather(buffer_owner, return_exceptions=True)
        buffer.put(item("next"))
        return [label(await buffer.take()), label(await buffer.take())]

    assert run(scenario) == ["handed", "next"]


def test_take_older_than_removes_only_older_items_in_order() -> None:
    buffer = Buffer()
    for name, at in [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)]:
        buffer.put(item(name, at))
    assert [label(i) for i in buffer.take_older_than(3.0)] == ["a", "b"]
    assert len(buffer) == 2
    assert buffer.take_older_than(0.5) == []
    buffer.clear()
    assert len(buffer) == 0
