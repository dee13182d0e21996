"""Many publishes in one write, against the real RabbitMQ; and how a batch is split in rounds."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from eventbus.backends import aio
from eventbus.delivery import bulk
from eventbus.delivery.channels import bounded
from eventbus.delivery.envelope import Envelope
from eventbus.delivery.publisher import _rounds
from eventbus.errors import Unavailable
from tests.servers import unique_name


def publishes(queue: str, count: int, *, mandatory: bool = True) -> list[bulk.Publish]:
    return [
        bulk.Publish("", queue, mandatory, f"m{i}".encode(), Basic.Properties(message_id=f"id-{i}"))
        for i in range(count)
    ]


async def on_confirm_channel(
    amqp_url: str, work: Callable[[aiormq.Channel, aio_pika.abc.AbstractChannel], Awaitable[Any]]
) -> Any:
    """(asyncio side) Run work(underlying confirm channel, channel) on a fresh connection."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        return await work(underlay, channel)


async def send_and_read(amqp_url: str, count: int) -> tuple[list[Any], list[bytes], int]:
    """Send count messages in one go; returns the confirms, the bodies read back in order and
    how many return-matching entries the channel still keeps."""
    queue = unique_name("bulk")

    async def work(underlay: aiormq.Channel, channel: aio_pika.abc.AbstractChannel) -> Any:
        declared = await channel.declare_queue(queue, auto_delete=False)
        confirms = await asyncio.gather(*await bulk.send(underlay, publishes(queue, count)))
        bodies = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        await declared.delete(if_unused=False, if_empty=False)
        return confirms, bodies, len(underlay.message_id_delivery_tag)

    result: tuple[list[Any], list[bytes], int] = await on_confirm_channel(amqp_url, work)
    return result


async def test_every_message_of_a_bulk_send_is_confirmed_and_arrives_in_order(
    amqp_url: str,
) -> None:
    async with aio.open_loop(lambda: None):
        confirms, bodies, still_mapped = await aio.call(send_and_read, amqp_url, 300)
    assert all(isinstance(c, Basic.Ack) for c in confirms) and len(confirms) == 300
    assert bodies == [f"m{i}".encode() for i in range(300)]
    assert still_mapped == 0  # nothing kept once confirmed


async def test_a_body_larger_than_a_frame_is_split_and_arrives_whole(amqp_url: str) -> None:
    queue = unique_name("bulk-large")
    body = bytes(range(256)) * 4096  # 1 MiB, several AMQP frames

    async def work(underlay: aiormq.Channel, channel: aio_pika.abc.AbstractChannel) -> Any:
        declared = await channel.declare_queue(queue)
        big = bulk.Publish("", queue, True, body, Basic.Properties(message_id="big"))
        (confirm,) = await asyncio.gather(*await bulk.send(underlay, [big]))
        message = await declared.get(no_ack=True)
        await declared.delete(if_unused=False, if_empty=False)
        return confirm, message.body

    async with aio.open_loop(lambda: None):
        confirm, received = await aio.call(on_confirm_channel, amqp_url, work)
    assert isinstance(confirm, Basic.Ack)
    assert received == body


async def test_an_unroutable_mandatory_message_resolves_to_the_returned_message(
    amqp_url: str,
) -> None:
    missing = unique_name("no-such-queue")

    async def work(underlay: aiormq.Channel, _: aio_pika.abc.AbstractChannel) -> Any:
        sent = publishes(missing, 3)
        sent.append(bulk.Publish("", missing, True, b"no id", Basic.Properties()))
        results = await asyncio.gather(*await bulk.send(underlay, sent))
        return results, len(underlay.message_id_delivery_tag)

    async with aio.open_loop(lambda: None):
        results, still_mapped = await aio.call(on_confirm_channel, amqp_url, work)
    assert not any(isinstance(r, Basic.Ack) for r in results)
    assert [r.body for r in results] == [b"m0", b"m1", b"m2", b"no id"]
    assert still_mapped == 0


async def test_a_message_the_client_library_refuses_fails_alone(amqp_url: str) -> None:
    queue = unique_name("bulk-refused")

    async def work(underlay: aiormq.Channel, channel: aio_pika.abc.AbstractChannel) -> Any:
        declared = await channel.declare_queue(queue)
        sent = publishes(queue, 5)
        sent[2] = bulk.Publish("ex\u00e9", queue, False, b"bad", Basic.Properties())  # not ASCII
        results = await asyncio.gather(*await bulk.send(underlay, sent), return_exceptions=True)
        bodies = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            bodies.append(message.body)
        await declared.delete(if_unused=False, if_empty=False)
        return results, bodies

    async with aio.open_loop(lambda: None):
        results, bodies = await aio.call(on_confirm_channel, amqp_url, work)
    assert isinstance(results[2], bulk.Unmarshallable) and "exchange" in str(results[2])
    assert all(isinstance(r, Basic.Ack) for i, r in enumerate(results) if i != 2)
    assert bodies == [b"m0", b"m1", b"m3", b"m4"]


async def test_without_the_channel_internals_it_publishes_one_by_one(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CHANNEL_ATTRIBUTES", (*bulk.CHANNEL_ATTRIBUTES, "not_there"))
    async with aio.open_loop(lambda: None):
        confirms, bodies, _ = await aio.call(send_and_read, amqp_url, 20)
    assert all(isinstance(c, Basic.Ack) for c in confirms) and len(confirms) == 20
    assert sorted(bodies) == sorted(f"m{i}".encode() for i in range(20))


def test_a_message_id_twice_in_a_batch_goes_in_a_later_round() -> None:
    def message(message_id: str, queue: str) -> Any:
        return (("queue", queue), Envelope(message_id, b"x", 2).to_amqp(0))

    batch = [message("a", "q1"), message("b", "q1"), message("a", "q2"), message("a", "q3")]
    assert _rounds([0, 1, 2, 3], batch) == [[0, 1], [2], [3]]
    assert _rounds([0, 1], batch) == [[0, 1]]
    assert _rounds([1, 3], batch) == [[1, 3]]


async def test_a_send_on_a_channel_closed_meanwhile_is_unavailable(amqp_url: str) -> None:
    async def work(underlay: aiormq.Channel, channel: aio_pika.abc.AbstractChannel) -> Any:
        await channel.close()
        with pytest.raises(Unavailable, match="RabbitMQ is unavailable"):
            await bounded("publishing", bulk.send(underlay, publishes("q", 3)))

    async with aio.open_loop(lambda: None):
        await aio.call(on_confirm_channel, amqp_url, work)
