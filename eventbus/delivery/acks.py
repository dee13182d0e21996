"""Acks of consumed deliveries, written together per channel (asyncio side).

A hand-out acks its AMQP delivery once its delivery record is confirmed, and the records of many
hand-outs are confirmed together (they travel packed), so many acks are asked for in the same
turn of the event loop. Acks writes those of one channel in one go: one ack with multiple=True
for every one below the channel's lowest unsettled delivery, and one each for the others.
RabbitMQ's multiple ack settles every unacked delivery of the channel up to its tag, so it may
only go where each delivery below is settled already; and RabbitMQ refuses one whose own tag is
not unacked (closing the channel), so the tag it names is always one acked now.

Acks knows what is settled by being told: every ack of the channel goes through it, and each
requeue is reported once its nack is written (`settled`). Delivery tags count from 1 on each
channel; one never reported stays unsettled, which only keeps the later acks single. The writes
of one channel go out one after another, from one task, so none overtakes another.
"""

from __future__ import annotations

import asyncio
import logging

import aiormq.abc

from ..backends.broker import BROKER_ERRORS
from ..backends.retry import describe

logger = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0  # writing the acks asked for in one turn, as a single settle may take
ACK_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *BROKER_ERRORS)


class Acks:
    """The acks of one consuming channel, and which of its deliveries are settled."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._floor = 1  # every delivery below it is settled
        self._above: set[int] = set()  # the settled deliveries above the floor
        self._asked: list[tuple[int, asyncio.Future[bool]]] = []
        self._writer: asyncio.Future[None] | None = None

    def settled(self, tag: int) -> None:
        """Delivery tag is settled: its requeue written (or its ack, by this)."""
        self._above.add(tag)
        while self._floor in self._above:
            self._above.remove(self._floor)
            self._floor += 1

    async def ack(self, tag: int) -> bool:
        """Ack a delivery of the channel, with the others asked for meanwhile; waits until the
        acks are written. False when the channel failed: RabbitMQ then requeues the delivery."""
        written = asyncio.get_running_loop().create_future()
        self._asked.append((tag, written))
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())  # runs after this turn
        return bool(await written)

    async def _write_all(self) -> None:
        asked: list[tuple[int, asyncio.Future[bool]]] = []
        try:
            while self._asked:
                asked, self._asked = self._asked, []
                ok = await self._write(sorted(tag for tag, _ in asked))
                for _, written in asked:
                    if not written.done():
                        written.set_result(ok)
        finally:
            self._writer = None
            for _, written in [*asked, *self._asked]:  # cancelled midway: their callers too
                if not written.done():
                    written.cancel()
            self._asked.clear()

    async def _write(self, tags: list[int]) -> bool:
        """Ack tags (ascending): one multiple ack for those below the lowest unsettled delivery,
        one each for the rest."""
        for tag in tags:
            self.settled(tag)
        below = [tag for tag in tags if tag < self._floor]
        frames = [(below[-1], True)] if below else []
        frames += [(tag, False) for tag in tags if tag >= self._floor]
        try:
            async with asyncio.timeout(ACK_TIMEOUT):
                for tag, multiple in frames[:-1]:
                    await self.channel.basic_ack(tag, multiple=multiple, wait=False)
                last, multiple = frames[-1]
                await self.channel.basic_ack(last, multiple=multiple)  # and wait till written
        except ACK_ERRORS as error:
            logger.debug("acking %d deliveries failed: %s", len(tags), describe(error))
            return False
        return True
