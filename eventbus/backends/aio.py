"""The asyncio seam: the one place where trio code calls into asyncio libraries.

aio-pika, asyncpg, redis.asyncio and grpclib are asyncio libraries; the daemon runs them on a
trio-asyncio loop opened at the root of the trio task tree. Everything above this module is trio.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio
import trio_asyncio

from . import loopfix

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


async def call(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run an asyncio coroutine function from trio and wait for its result.

    Cancelling the trio caller cancels the asyncio side too.
    """
    return await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)  # type: ignore[no-any-return]


def run_trio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Wrap a trio async function so that asyncio code (grpclib handlers) can await it."""
    return trio_asyncio.trio_as_aio(fn)  # type: ignore[no-any-return]


@asynccontextmanager
async def open_loop(on_stray_error: Callable[[], None]) -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Open the trio-asyncio loop for the daemon, with a deliberate policy for stray errors.

    trio-asyncio re-raises whatever reaches the loop's exception handler, which would end the
    whole daemon. An error there belongs to no caller (a callback or a task nobody awaits, for
    example inside a library after a connection loss), so it is logged and counted instead.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = context.get("message", "unhandled asyncio error")
        if isinstance(error, asyncio.CancelledError | trio.Cancelled):
            logger.debug("asyncio: %s (cancelled)", message)
            return
        on_stray_error()
        logger.warning("asyncio: %s: %r", message, error, exc_info=error)

    loopfix.install()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(handle)
        yield loop
