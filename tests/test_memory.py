"""Trimming glibc's heaps once freed memory piles up: the trigger on trio's MockClock with a fake
measure and a fake trim, then the real thing where the C library is glibc."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import trio
import trio.testing

from eventbus.ops import memory

MIB = 1024 * 1024
STEP = memory.CHECK_SECONDS


class FakeHeap:
    """unused() reads .unused; trim() counts and sets .unused to what a trim leaves."""

    def __init__(self, unused: int) -> None:
        self.unused = unused
        self.after_trim = unused
        self.trims = 0

    def trim(self) -> None:
        self.trims += 1
        self.unused = self.after_trim


async def watched(heap: FakeHeap, values: list[int]) -> list[int]:
    """Set heap.unused to each value just before a check; the trims counted after each."""
    trims = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.trim_when_unused_grows, lambda: heap.unused, heap.trim)
        await trio.sleep(STEP / 2)
        for value in values:
            heap.unused = value
            await trio.sleep(STEP)
            trims.append(heap.trims)
        nursery.cancel_scope.cancel()
    return trims


async def test_growth_below_the_mark_is_left_alone(autojump_clock: trio.testing.MockClock) -> None:
    heap = FakeHeap(40 * MIB)
    trims = await watched(heap, [45 * MIB, 55 * MIB, 30 * MIB, 40 * MIB])
    assert trims == [0, 0, 0, 0]


async def test_one_trim_per_pile_of_freed_memory(autojump_clock: trio.testing.MockClock) -> None:
    heap = FakeHeap(40 * MIB)
    heap.after_trim = 42 * MIB
    trims = await watched(heap, [60 * MIB, 50 * MIB, 57 * MIB, 58 * MIB, 80 * MIB])
    # 60 is 20 over the start: trimmed down to 42; 57 is only 15 over that, 58 is 16.
    assert trims == [1, 1, 1, 2, 3]


async def test_growth_counts_from_the_lowest_point(autojump_clock: trio.testing.MockClock) -> None:
    heap = FakeHeap(40 * MIB)
    trims = await watched(heap, [20 * MIB, 30 * MIB, 36 * MIB])
    assert trims == [0, 0, 1]


# Run in a process of its own: what the test process allocated and freed before (other tests)
# moves glibc's mmap and trim thresholds, so the same steps in it may leave nothing to trim.
TRIM_SCENARIO = """
import logging, sys
import trio, trio.testing
from eventbus.ops import memory

MIB = 1024 * 1024
STEP = memory.CHECK_SECONDS
seen = []

class Catch(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())

logging.getLogger("eventbus.ops.memory").addHandler(Catch())
logging.getLogger("eventbus.ops.memory").setLevel(logging.DEBUG)

async def main():
    freed = b"x" * MIB
    del freed  # a freed 1 MiB mapping raises the mmap threshold above the bodies
    async with trio.open_nursery() as nursery:
        nursery.start_soon(memory.give_back_freed_memory)
        await trio.sleep(STEP / 2)
        bodies = [(b"x" * (200 * 1024), bytearray(1000)) for _ in range(400)]
        await trio.sleep(STEP)
        in_use = any("trimmed the heap" in line for line in seen)
        bodies = [(b"", live) for _, live in bodies]
        await trio.sleep(STEP)
        freed = any("trimmed the heap" in line for line in seen)
        nursery.cancel_scope.cancel()
    print(in_use, freed)

trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_bodies_in_the_heap_are_trimmed() -> None:
    ran = subprocess.run(
        [sys.executable, "-c", TRIM_SCENARIO], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0, ran.stderr
    in_use, freed = ran.stdout.split()
    assert in_use == "False"  # bodies in use: nothing to give back
    assert freed == "True"  # the freed bodies are given back
