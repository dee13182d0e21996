"""Many confirmed publishes in one write on an aiormq channel: the crons' bulk path.

aiormq's basic_publish spends, per message, a task, a lock round, a write-queue put and a socket
write; for the delay and republish jobs, which publish hundreds at once, that halves what one
connection carries. send() takes the channel's lock once, registers one confirmation per message
the way basic_publish does, and hands every frame to the connection's writer as one block.

Each message is marshalled on its own: one the client library refuses (pamqp checks exchange
names, for example) resolves at once to an Unmarshallable error and the others go.

Confirmations are kept lighter than aiormq's own, which cost several loop callbacks per message
(a future registered in two future stores, a callback to forget a mandatory message's id, one
scheduled callback per tag a multiple confirm covers): Confirms, one per channel, registers plain
futures, settles the tags a confirm covers in place and forgets their ids then, and fails what is
still unconfirmed when the channel closes, as aiormq's future stores would.

Confirms also notes a Basic.Nack, so the pool can replace the channel (see
channels.ChannelPool): a channel RabbitMQ nacked may nack every later publish to that queue.

It relies on aiormq channel attributes that are not part of its documented API (delivery_tag,
confirmations, message_id_delivery_tag, write_queue, number, _split_body), checked on each
send (a few attribute lookups); without them send() publishes message by message through
basic_publish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiormq
import pamqp.frame
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic
from pamqp.header import ContentHeader

logger = logging.getLogger(__name__)

CONFIRMS = "_eventbus_confirms"  # where a channel keeps its Confirms

CHANNEL_ATTRIBUTES = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "lock",
    "create_future",
    "_split_body",
    "_on_confirm_frame",
    "_confirm_delivery",
    "publisher_confirms",
    "closing",
    "loop",
)


@dataclass(frozen=True)
class Publish:
    """One message to publish. A mandatory one is given a message_id if it has none: RabbitMQ's
    return of an unroutable message names no delivery tag, so aiormq matches it by that id."""

    exchange: str
    routing_key: str
    mandatory: bool
    body: bytes
    properties: Basic.Properties


class Unmarshallable(Exception):
    """The client library refused to marshal a message (a name or property it does not take)."""


# What pamqp raises for a value it cannot encode.
MARSHAL_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)


def supported(channel: aiormq.Channel) -> bool:
    return all(hasattr(channel, name) for name in CHANNEL_ATTRIBUTES)


async def send(channel: aiormq.Channel, publishes: Sequence[Publish]) -> list[asyncio.Future[Any]]:
    """(asyncio side) Publish on a confirm channel; returns one future per message, resolving to
    RabbitMQ's Basic.Ack, to the message itself when RabbitMQ returned it as unroutable, or to
    Unmarshallable when the client library refused it (then it was not sent)."""
    if not supported(channel):
        return [asyncio.ensure_future(_one_by_one(channel, p)) for p in publishes]
    confirms = Confirms.of(channel)
    blocks = [_marshalled(channel, p) for p in publishes]
    sendable = [p for p, block in zip(publishes, blocks, strict=True) if isinstance(block, bytes)]
    payload = b"".join(block for block in blocks if isinstance(block, bytes))
    async with channel.lock:
        confirmations = iter(confirms.register(sendable))
        try:
            if sendable:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except BaseException:
            confirms.unregister(sendable, list(confirmations))
            raise
    return [next(confirmations) if isinstance(b, bytes) else _refused(b) for b in blocks]


def _marshalled(channel: aiormq.Channel, publish: Publish) -> bytes | Unmarshallable:
    """One message's frames as bytes, or why the client library refuses them."""
    try:
        frames = _frames(channel, publish)
        return b"".join(pamqp.frame.marshal(frame, channel.number) for frame in frames)
    except MARSHAL_ERRORS as error:
        return Unmarshallable(f"{type(error).__name__}: {error}")


def _refused(error: Unmarshallable) -> asyncio.Future[Any]:
    refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    refused.set_exception(error)
    return refused


def _frames(channel: aiormq.Channel, p: Publish) -> list[Any]:
    if p.mandatory and not p.properties.message_id:
        p.properties.message_id = uuid.uuid4().hex  # as basic_publish does, for returns
    return [
        Basic.Publish(exchange=p.exchange, routing_key=p.routing_key, mandatory=p.mandatory),
        ContentHeader(properties=p.properties, body_size=len(p.body)),
        *channel._split_body(p.body),
    ]


def nacked(channel: aiormq.Channel) -> bool:
    """Whether RabbitMQ answered a publish that send() wrote on channel with Basic.Nack."""
    confirms = channel.__dict__.get(CONFIRMS)
    return confirms is not None and bool(confirms.nacked)


class Confirms:
    """A channel's confirmations of what send() published on it."""

    def __init__(self, channel: aiormq.Channel) -> None:
        self._channel = channel
        self._message_ids: dict[int, str] = {}  # tag -> message id, of mandatory messages
        self.nacked = False  # RabbitMQ answered a publish on this channel with Basic.Nack
        channel.__dict__["_on_confirm_frame"] = self._on_confirm_frame
        channel.closing.add_done_callback(self._fail_unconfirmed)

    @classmethod
    def of(cls, channel: aiormq.Channel) -> Confirms:
        confirms = channel.__dict__.get(CONFIRMS)
        if confirms is None:
            confirms = channel.__dict__[CONFIRMS] = cls(channel)
        return confirms

    def register(self, publishes: Sequence[Publish]) -> list[asyncio.Future[Any]]:
        """Expect a confirm for each publish, under the next delivery tags (the lock is held).
        A mandatory message's id is noted, as aiormq does: RabbitMQ's return of it names no tag."""
        channel, loop = self._channel, self._channel.loop
        confirmations = []
        first = channel.delivery_tag + 1
        for tag, publish in zip(itertools.count(first), publishes):
            confirmation = loop.create_future()
            channel.confirmations[tag] = confirmation
            message_id = publish.properties.message_id
            if publish.mandatory and message_id:
                channel.message_id_delivery_tag[message_id] = tag
                self._message_ids[tag] = message_id
            confirmations.append(confirmation)
        channel.delivery_tag += len(publishes)
        return confirmations

    def unregister(
        self, publishes: Sequence[Publish], confirmations: list[asyncio.Future[Any]]
    ) -> None:
        """Undo register for frames that never reached the writer (the lock is still held)."""
        channel = self._channel
        channel.delivery_tag -= len(publishes)
        first = channel.delivery_tag + 1
        for tag, confirmation in zip(itertools.count(first), confirmations):
            channel.confirmations.pop(tag, None)
            self._forget(tag)
            confirmation.cancel()

    async def _on_confirm_frame(self, frame: Any) -> None:
        """aiormq's Channel._on_confirm_frame, settling in place the tags a confirm covers (the
        tags are copied first: settling removes them)."""
        channel = self._channel
        if not channel.publisher_confirms:
            return
        self.nacked = self.nacked or isinstance(frame, Basic.Nack)
        last = frame.delivery_tag
        multiple = getattr(frame, "multiple", False)
        for tag in [t for t in channel.confirmations if t <= last] if multiple else [last]:
            channel._confirm_delivery(tag, frame)
            self._forget(tag)

    def _forget(self, tag: int) -> None:
        message_id = self._message_ids.pop(tag, None)
        ids = self._channel.message_id_delivery_tag
        if message_id is not None and ids.get(message_id) == tag:
            del ids[message_id]

    def _fail_unconfirmed(self, closing: asyncio.Future[Any]) -> None:
        """The channel closed: what it did not confirm will never be (aiormq's future stores
        would fail the futures they know; these they do not)."""
        reason = None if closing.cancelled() else closing.exception()
        error = reason or ChannelInvalidStateError("the channel closed before confirming")
        for confirmation in list(self._channel.confirmations.values()):
            if isinstance(confirmation, asyncio.Future) and not confirmation.done():
                confirmation.set_exception(error)
                confirmation.exception()  # read: nobody need be told it was never read
        self._message_ids.clear()


async def _one_by_one(channel: aiormq.Channel, publish: Publish) -> Any:
    try:
        return await channel.basic_publish(
            publish.body,
            exchange=publish.exchange,
            routing_key=publish.routing_key,
            properties=publish.properties,
            mandatory=publish.mandatory,
            wait=False,
        )
    except MARSHAL_ERRORS as error:
        raise Unmarshallable(f"{type(error).__name__}: {error}") from None
