"""Delivery records and settlements coalesced into packed internal messages (request path).

A hand-out publishes its delivery record, and an ack or nack its settlement, through an internal
queue and waits for RabbitMQ's confirm. One message each would cost a publish and a confirm, and
the bookkeeping a delivery, a decode and an ack, per item. A Packer gathers what its callers put
while earlier packs of its queue are on their way (at most `in_flight` of them), plus what comes
in the same turn of the event loop, and hands it to its `send` as one pack: each caller waits for
that pack's fate, and a failure of the pack fails every one of them. Under a light load a pack
holds one item and goes at once; under a heavy one packs grow, up to `most` items or `most_bytes`.

With in_flight 1 the packs go out one after another, each once the one before was sent, so the
queue holds the items in the order their callers were answered (the settlements queue relies on
that). Asyncio side: callers and sends run on the asyncio loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

MOST = 500  # items in one pack (the bookkeeping's batch size)
MOST_BYTES = 1 << 20  # a pack ends with the item that brings it to this many bytes


class Packer(Generic[T]):
    """Coalesces the items put into packs, each sent by send(items), in the order put."""

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[None]],
        *,
        in_flight: int,
        size: Callable[[T], int] = lambda _: 0,
        most: int = MOST,
        most_bytes: int = MOST_BYTES,
    ) -> None:
        self._send = send
        self._in_flight = in_flight
        self._size = size
        self._most = most
        self._most_bytes = most_bytes
        self._waiting: deque[tuple[T, asyncio.Future[None]]] = deque()
        self._flying = 0
        self._scheduled = False
        self._tasks: set[asyncio.Future[None]] = set()

    async def put(self, item: T) -> None:
        """(asyncio side) Send item in the next pack; waits until that pack is sent, and raises
        what failed it. A caller that leaves meanwhile leaves its item in the pack."""
        loop = asyncio.get_running_loop()
        sent = loop.create_future()
        self._waiting.append((item, sent))
        self._schedule(loop)
        await sent

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Send what waits at the end of this turn of the loop, when a pack may go now."""
        if not self._scheduled and self._waiting and self._flying < self._in_flight:
            self._scheduled = True
            loop.call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if not self._waiting or self._flying >= self._in_flight:
            return
        self._flying += 1
        flight = asyncio.ensure_future(self._fly(self._take()))
        self._tasks.add(flight)  # a task nobody holds could be collected midway
        flight.add_done_callback(self._tasks.discard)
        self._schedule(asyncio.get_running_loop())

    def _take(self) -> list[tuple[T, asyncio.Future[None]]]:
        """The next pack: at least one item, up to most, ending with the one that brings it to
        most_bytes."""
        pack: list[tuple[T, asyncio.Future[None]]] = []
        size = 0
        while self._waiting and len(pack) < self._most and size < self._most_bytes:
            pack.append(self._waiting.popleft())
            size += self._size(pack[-1][0])
        return pack

    async def _fly(self, pack: list[tuple[T, asyncio.Future[None]]]) -> None:
        try:
            await self._send([item for item, _ in pack])
        except asyncio.CancelledError:
            for _, sent in pack:
                sent.cancel()
            raise
        except Exception as error:
            for _, sent in pack:
                if not sent.done():
                    sent.set_exception(error)
        else:
            for _, sent in pack:
                if not sent.done():
                    sent.set_result(None)
        finally:
            self._flying -= 1
            self._schedule(asyncio.get_running_loop())
