"""Giving back to the system the memory large message bodies held, once they are gone.

CPython takes every object over 512 bytes (a message body, say) from the C allocator. glibc's
malloc serves a request of at least its mmap threshold (128 KiB at start) with a mapping of its
own, but freeing such a mapping raises the threshold to its size (up to 32 MiB): from then on
bodies of that size come from the heap, and a few live objects between them keep the freed
space there, resident, after a backlog of large messages has drained. Fixing the thresholds
would give every large body a mapping of its own, at the price of a mmap, a munmap and their
page faults per body (publishing and draining large messages about 1.5 times slower). Instead
the thresholds keep adapting, and a background task calls malloc_trim, which gives back the
free pages anywhere in the heap, once the resident memory malloc does not hand out (RSS less
what malloc has handed out) has grown by TRIM_AFTER_BYTES since its lowest point since the last
trim. It looks every CHECK_SECONDS (mallinfo2 and /proc/self/statm, well under a millisecond);
a trim takes a few milliseconds, about 40 when 300 MiB of heap are free.

Other C libraries (musl, say) have no malloc_trim or mallinfo2; there this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Callable

import trio

logger = logging.getLogger(__name__)

CHECK_SECONDS = 5
TRIM_AFTER_BYTES = 16 * 1024 * 1024
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class Mallinfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (<malloc.h>, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",  # bytes in chunks that have mappings of their own
            "usmblks",
            "fsmblks",
            "uordblks",  # bytes handed out from the heaps
            "fordblks",
            "keepcost",
        )
    ]


async def give_back_freed_memory() -> None:
    """(daemon task) Trim glibc's heaps whenever freed memory piles up (see the module
    docstring); waits forever, or returns at once where the C library cannot."""
    libc = ctypes.CDLL(None)
    try:
        malloc_trim, mallinfo2 = libc.malloc_trim, libc.mallinfo2
    except AttributeError:
        logger.debug("memory: no malloc_trim or mallinfo2 in this C library; nothing trimmed")
        return
    mallinfo2.restype = Mallinfo2

    def unused() -> int:
        info = mallinfo2()
        return resident_bytes() - int(info.uordblks) - int(info.hblkhd)

    def trim() -> None:
        before, started = resident_bytes(), time.perf_counter()
        malloc_trim(0)
        logger.debug(
            "memory: trimmed the heap from %.1f to %.1f MiB resident in %.1f ms",
            before / 2**20,
            resident_bytes() / 2**20,
            (time.perf_counter() - started) * 1000,
        )

    await trim_when_unused_grows(unused, trim)


async def trim_when_unused_grows(unused: Callable[[], int], trim: Callable[[], object]) -> None:
    """Every CHECK_SECONDS, call trim() if unused() has grown by TRIM_AFTER_BYTES since its
    lowest value since the last trim (or the start); waits forever."""
    lowest = unused()
    while True:
        await trio.sleep(CHECK_SECONDS)
        now = unused()
        if now - lowest >= TRIM_AFTER_BYTES:
            trim()
            lowest = unused()
        else:
            lowest = min(lowest, now)


def resident_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES
