"""Many confirmed publishes in one write on an aiormq channel: the crons' bulk path.

aiormq's basic_publish spends, per message, a task, a lock round, a write-queue put and a socket
write; for the delay and republish jobs, which publish hundreds at once, that halves what one
connection carries. send() takes the channel's lock once, registers one confirmation per message
the way basic_publish does, and hands every frame to the connection's writer as one block.

Each message is marshalled on its own: one the client library refuses (pamqp checks exchange
names, for example) resolves at once to an Unmarshallable error and the others go.

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
from pamqp.commands import Basic
from pamqp.header import ContentHeader

logger = logging.getLogger(__name__)

CHANNEL_ATTRIBUTES = (
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "lock",
    "create_future",
    "_split_body",
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
    blocks = [_marshalled(channel, p) for p in publishes]
    sendable = [p for p, block in zip(publishes, blocks, strict=True) if isinstance(block, bytes)]
    payload = b"".join(block for block in blocks if isinstance(block, bytes))
    async with channel.lock:
        confirmations = iter(_register(channel, sendable))
        try:
            if sendable:
                await channel.write_queue.put(ChannelFrame(payload=payload, should_close=False))
        except BaseException:
            _unregister(channel, sendable, list(confirmations))
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


def _register(channel: aiormq.Channel, publishes: Sequence[Publish]) -> list[asyncio.Future[Any]]:
    """Expect a confirm for each publish, under the next delivery tags (the lock is held)."""
    confirmations = []
    first = channel.delivery_tag + 1
    for tag, publish in zip(itertools.count(first), publishes):
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        message_id = publish.properties.message_id
        if publish.mandatory and message_id:
            channel.message_id_delivery_tag[message_id] = tag
            confirmation.add_done_callback(_forgetter(channel, message_id, tag))
        confirmations.append(confirmation)
    channel.delivery_tag += len(publishes)
    return confirmations


def _unregister(
    channel: aiormq.Channel,
    publishes: Sequence[Publish],
    confirmations: list[asyncio.Future[Any]],
) -> None:
    """Undo _register for frames that never reached the writer (the lock is still held)."""
    channel.delivery_tag -= len(publishes)
    first = channel.delivery_tag + 1
    for tag, publish, confirmation in zip(itertools.count(first), publishes, confirmations):
        channel.confirmations.pop(tag, None)
        message_id = publish.properties.message_id
        if message_id and channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]
        confirmation.cancel()


def _forgetter(channel: aiormq.Channel, message_id: str, tag: int) -> Any:
    def forget(_: asyncio.Future[Any]) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]

    return forget


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
