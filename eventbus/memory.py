"""The C allocator's settings, so memory held by large message bodies goes back to the system.

CPython takes every object over 512 bytes (a message body, say) from the C allocator. glibc's
malloc serves a request of at least its mmap threshold (128 KiB at start) with a mapping of its
own, returned to the system when freed; but freeing such a mapping raises the threshold to its
size (up to 32 MiB), so from then on bodies of that size come from the heap, where a few live
objects between them keep the freed space from being returned. After a backlog of large
messages drains, the daemon would keep the memory its buffers held. Fixing both thresholds ends
that adjustment: bodies of 128 KiB and more always have mappings of their own, and the heap is
trimmed whenever 128 KiB at its top are free.

Other C libraries (musl, say) have no mallopt; there this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept from now on
TRIM_THRESHOLD = 128 * 1024


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); False where the C
    library has no mallopt or refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        logger.debug("memory: no mallopt in this C library; allocator left as it is")
        return False
    tuned = all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        )
    )
    if not tuned:
        logger.warning("memory: mallopt refused the thresholds; allocator left as it is")
    return tuned
