"""Single keys from the terminal for `eventbus top`, read under trio."""

from __future__ import annotations

import os
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import trio


@contextmanager
def cbreak(stream: TextIO) -> Iterator[int | None]:
    """Keys arrive one at a time and unechoed while the block runs (Ctrl-C still signals), the
    terminal restored after; yields the descriptor to read them from, None off a terminal."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # replaced by something without a descriptor
        fd = -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def keys(fd: int) -> str:
    """The keys typed since the last call; waits for one. "" at the end of input."""
    await trio.lowlevel.wait_readable(fd)
    return os.read(fd, 64).decode(errors="replace")
