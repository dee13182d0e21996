"""Single publishes asked for in one turn of the event loop, written to their channel together.

Each unary publish, and each pack of delivery records or settlements, goes over one of the
publisher's confirm channels. Written one by one, each costs the channel's lock, a frame put on
the connection's write queue, a wake-up of its writer and a socket send. The publishes asked
for on one channel in the same turn of the event loop (the calls of one read from a gRPC
connection, say) go in one bulk.send instead: the first of them lets the rest of the turn run,
then writes them all. Each caller gets its own confirmation; a write that fails fails each of
them, as it would have failed each alone. A caller that leaves before the write does not take
the others' publishes with it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq

from . import bulk

Confirmation = asyncio.Future[Any]
Entry = tuple[bulk.Publish, asyncio.Future[Confirmation]]  # a publish, where its confirmation goes


class Outbox:
    """The publishes of this turn of the event loop, per channel (asyncio side)."""

    def __init__(self) -> None:
        self._open: dict[int, list[Entry]] = {}  # by id(channel), until its first one writes
        self._handed_on: set[asyncio.Future[None]] = set()

    async def send(self, channel: aiormq.Channel, publish: bulk.Publish) -> Confirmation:
        """Write publish on channel with the others of this turn; returns its confirmation, as
        bulk.send does, or raises what failed the write."""
        handed: asyncio.Future[Confirmation] = asyncio.get_running_loop().create_future()
        batch = self._open.get(id(channel))
        if batch is not None:
            batch.append((publish, handed))
            return await handed  # the first of the turn writes it
        batch = self._open[id(channel)] = [(publish, handed)]
        try:
            await asyncio.sleep(0)  # the rest of the turn joins
            del self._open[id(channel)]
            await _write(channel, batch)
        except asyncio.CancelledError:  # nothing of the batch was written
            self._open.pop(id(channel), None)
            self._hand_on(channel, [entry for entry in batch[1:] if not entry[1].done()])
            raise
        return await handed

    def _hand_on(self, channel: aiormq.Channel, batch: list[Entry]) -> None:
        """Write the others' publishes without their first, whose caller left."""
        if batch:
            writing = asyncio.ensure_future(_write(channel, batch))
            self._handed_on.add(writing)
            writing.add_done_callback(self._handed_on.discard)


async def _write(channel: aiormq.Channel, batch: list[Entry]) -> None:
    """bulk.send the batch, handing each its confirmation or the error. Cancelled, it wrote
    nothing (bulk.send puts the frames on the write queue last, in one go)."""
    try:
        confirmations = await bulk.send(channel, [publish for publish, _ in batch])
    except Exception as error:
        for _, handed in batch:
            if not handed.done():
                handed.set_exception(error)
        return
    for (_, handed), confirmation in zip(batch, confirmations, strict=True):
        if not handed.done():
            handed.set_result(confirmation)
