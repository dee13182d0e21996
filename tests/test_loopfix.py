"""The changes to trio-asyncio's loop: callbacks queued by finalizers during a collection."""

from __future__ import annotations

import gc

import trio
import trio.lowlevel

from eventbus.backends import aio, loopfix


class QueuesOnFinalize:
    """Like aio-pika's Connection: its finalizer schedules work on the asyncio loop."""

    def __init__(self, loop: object, log: list[str], collecting: list[bool]) -> None:
        self.loop, self.log, self.collecting = loop, log, collecting
        self.cycle = self  # only the cyclic collector frees it

    def __del__(self) -> None:
        self.collecting.append(loopfix._Collection.running)
        self.loop.call_soon(self.log.append, "from finalizer")  # type: ignore[attr-defined]


async def test_a_callback_queued_by_a_finalizer_during_a_collection_runs() -> None:
    log: list[str] = []
    collecting: list[bool] = []
    async with aio.open_loop(lambda: None) as loop:
        QueuesOnFinalize(loop, log, collecting)
        gc.collect()
        loop.call_soon(log.append, "ordinary")
        await trio.sleep(0.1)
    assert collecting == [True]  # the finalizer ran inside the collection...
    assert sorted(log) == ["from finalizer", "ordinary"]  # ...and its callback still ran
    assert loopfix._Collection.running is False


async def test_many_finalizers_while_the_loop_is_busy_leave_it_working() -> None:
    log: list[str] = []
    collecting: list[bool] = []

    async def busy() -> None:
        for _ in range(200):
            await trio.lowlevel.checkpoint()

    async with aio.open_loop(lambda: None) as loop, trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        for _ in range(50):
            QueuesOnFinalize(loop, log, collecting)
            gc.collect()
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.1)
        assert await aio.call(asyncio_round_trip) == "answered"
    assert log == ["from finalizer"] * 50


async def asyncio_round_trip() -> str:
    import asyncio

    await asyncio.sleep(0.01)
    return "answered"
