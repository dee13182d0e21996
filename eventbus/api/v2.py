"""The v2 gRPC services eventbus.v2.Publisher and eventbus.v2.Subscriber (Admin: api/admin.py).

Each method translates between protobuf messages and the delivery logic; the gate maps errors to
status codes. StreamingPull runs one StreamSession (delivery/stream.py) for as long as the
stream lasts: requests apply acks, nacks and deadline changes; a sender passes deliveries on in
batches; a sweeper brings back what missed its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from grpclib.server import Stream

from .._generated import v2_grpc, v2_pb2
from ..backends.broker import Broker
from ..config import Config
from ..delivery import validate
from ..delivery.batches import BatchPublishing
from ..delivery.envelope import DeliveryRecord
from ..delivery.operations import Delivery
from ..delivery.publisher import Publisher
from ..delivery.redelivery import DEAD_ON_REQUEST, Failure, Redelivery
from ..delivery.stream import MAX_DEADLINE, Lease, Streams, StreamSession, is_stream_ack_id
from ..errors import InvalidArgument, PermissionDenied, Unavailable
from ..ops.metrics import Metrics
from ..security.access import Permission, caller, require
from ..security.quotas import Quotas
from .rpc import Gate

MAX_OUTSTANDING = 10_000
DEFAULT_OUTSTANDING = 100
MAX_IDS = 10_000  # ack ids in one request
MAX_ACK_ID_LENGTH = 64  # stream ids are 37 characters at most, recorded ones 36
MAX_PULL = 1000  # messages in one Pull
MAX_WAIT = 300.0  # seconds a Pull may wait

Settle = Callable[[str], Awaitable[None]]  # settles one recorded delivery


class PublisherService(v2_grpc.PublisherBase):
    """Batches of messages to queues and topics."""

    def __init__(
        self, gate: Gate, publishing: BatchPublishing, quotas: Quotas | None = None
    ) -> None:
        self._gate = gate
        self._publishing = publishing
        self._quotas = quotas or Quotas()

    async def Publish(self, stream: Any) -> None:
        await self._gate.unary(stream, "eventbus.v2.Publisher/Publish", self._publish)

    async def _publish(self, request: v2_pb2.PublishRequest) -> v2_pb2.PublishResponse:
        _check_publishing(request.messages)
        self._quotas.publish(caller(), len(request.messages))  # the whole batch, or nothing
        batch = await self._publishing.publish(request.messages)
        return v2_pb2.PublishResponse(
            results=[
                v2_pb2.PublishResult(message_id=m.message_id, duplicate=m.duplicate) for m in batch
            ]
        )


def _check_publishing(messages: Sequence[v2_pb2.OutboundMessage]) -> None:
    """The whole batch is refused when the caller may not publish to one of its targets."""
    identity = caller()
    for i, message in enumerate(messages):
        target = message.topic or message.queue
        if target and not identity.may(Permission.PUBLISH, target):  # none: validation says so
            try:
                require(Permission.PUBLISH, target)
            except PermissionDenied as error:
                raise PermissionDenied(f"messages[{i}]: {error.message}") from None


def _require_subscribe(queue: str, topic: str) -> None:
    require(Permission.SUBSCRIBE, queue)
    if topic:  # the group queue is bound to the topic: reading it reads both
        require(Permission.SUBSCRIBE, topic)


class Subscriptions:
    """What the Subscriber service works with: the queues, the node's streams, the retries."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        publisher: Publisher,
        delivery: Delivery,
        redelivery: Redelivery,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.broker = broker
        self.publisher = publisher
        self.delivery = delivery
        self.redelivery = redelivery
        self.metrics = metrics
        self.streams = Streams(config.server.max_streaming_pulls)

    async def queue_of(self, queue: str, topic: str) -> str:
        """The queue a subscription reads: queue itself, or the group queue bound to topic."""
        namespace = self.config.amqp.namespace
        validate.name("queue", queue, namespace)
        if topic:
            validate.name("topic", topic, namespace)
            await self.publisher.bind(queue, topic)
        else:
            await self.publisher.declare(queue)
        return queue

    def ack_deadline(self, requested: int, queue: str) -> float:
        """A stream's ack deadline: as asked (1-MAX_DEADLINE s), else its queue's policy's
        (at most MAX_DEADLINE: a stream's deliveries are extended, not held long at once)."""
        policy = self.redelivery.policies.for_queue(queue)
        return float(requested or min(policy.ack_deadline_seconds, MAX_DEADLINE))


class SubscriberService(v2_grpc.SubscriberBase):
    """Pull, StreamingPull, Acknowledge, Nack and ModifyAckDeadline."""

    def __init__(
        self, gate: Gate, subscriptions: Subscriptions, quotas: Quotas | None = None
    ) -> None:
        self._gate = gate
        self._subs = subscriptions
        self._quotas = quotas or Quotas()

    async def Pull(self, stream: Any) -> None:
        await self._gate.unary(stream, "eventbus.v2.Subscriber/Pull", self._pull)

    async def StreamingPull(self, stream: Any) -> None:
        await self._gate.call(
            stream, "eventbus.v2.Subscriber/StreamingPull", lambda: self._stream(stream)
        )

    async def Acknowledge(self, stream: Any) -> None:
        await self._gate.unary(stream, "eventbus.v2.Subscriber/Acknowledge", self._acknowledge)

    async def Nack(self, stream: Any) -> None:
        await self._gate.unary(stream, "eventbus.v2.Subscriber/Nack", self._nack)

    async def ModifyAckDeadline(self, stream: Any) -> None:
        await self._gate.unary(
            stream, "eventbus.v2.Subscriber/ModifyAckDeadline", self._modify_ack_deadline
        )

    async def _pull(self, request: v2_pb2.PullRequest) -> v2_pb2.PullResponse:
        most = request.max_messages or 1
        if most > MAX_PULL:
            raise InvalidArgument(f"max_messages must be 0-{MAX_PULL}")
        if not 0 <= request.wait_seconds <= MAX_WAIT:  # also refuses NaN
            raise InvalidArgument(f"wait_seconds must be 0-{MAX_WAIT}")
        _require_subscribe(request.queue, request.topic)
        with self._quotas.waiting_pull(caller()):
            queue = await self._subs.queue_of(request.queue, request.topic)
            records = await self._subs.delivery.pull_many(queue, most, request.wait_seconds)
        return v2_pb2.PullResponse(messages=[_recorded(record) for record in records])

    async def _stream(self, stream: Stream[Any, Any]) -> None:
        first = await stream.recv_message()
        if first is None:
            raise InvalidArgument("StreamingPull: the stream ended before its first request")
        _require_subscribe(first.queue, first.topic)
        with self._quotas.waiting_pull(caller()):  # one waiting pull while the stream is open
            await self._serve_stream(stream, first)

    async def _serve_stream(self, stream: Stream[Any, Any], first: Any) -> None:
        streams = self._subs.streams
        streams.take_slot()
        try:
            session = await self._open(first)
        except BaseException:
            streams.give_slot()
            raise
        streams.add(session)
        try:
            await _first_done(
                self._apply_requests(stream, session, first),
                self._send_deliveries(stream, session),
                session.expire(),
                _unavailable_when(session.closed()),
                session.revoked(),
                self._until_draining(),
            )
        finally:
            streams.remove(session)
            streams.give_slot()
            await session.close()

    async def _until_draining(self) -> None:
        """A stream never ends by itself: the daemon's graceful stop ends it (its unacked
        messages go back to their queue at once)."""
        await self._gate.stopping.wait()
        raise Unavailable("server is shutting down; open a new stream on another node")

    async def _open(self, first: v2_pb2.StreamingPullRequest) -> StreamSession:
        outstanding = first.max_outstanding_messages or DEFAULT_OUTSTANDING
        if outstanding > MAX_OUTSTANDING:
            raise InvalidArgument(f"max_outstanding_messages must be 0-{MAX_OUTSTANDING}")
        if first.ack_deadline_seconds > MAX_DEADLINE:
            raise InvalidArgument(f"ack_deadline_seconds must be 0-{MAX_DEADLINE}")
        queue = await self._subs.queue_of(first.queue, first.topic)
        deadline = self._subs.ack_deadline(first.ack_deadline_seconds, queue)
        session = StreamSession(queue, deadline, self._subs.redelivery, self._subs.metrics)
        session.topic, session.identity = first.topic, caller().name
        await session.open(self._subs.broker, outstanding)
        return session

    async def _apply_requests(
        self, stream: Stream[Any, Any], session: StreamSession, first: Any
    ) -> None:
        """Apply each request's acks, nacks and deadline changes until the client half-closes."""
        request = first
        while request is not None:
            _check_ids(request.ack_ids, request.nack_ids, request.modify_deadline_ack_ids)
            invalid = session.ack(request.ack_ids)
            invalid += session.nack(request.nack_ids, Failure("nack"))
            if request.modify_deadline_ack_ids:
                invalid += session.modify(request.modify_deadline_ack_ids, _seconds_of(request))
            session.report_invalid(invalid)
            request = await stream.recv_message()

    async def _send_deliveries(self, stream: Stream[Any, Any], session: StreamSession) -> None:
        while True:
            leases, invalid = await session.next_batch()
            await stream.send_message(
                v2_pb2.StreamingPullResponse(
                    messages=[_received(lease, session.queue) for lease in leases],
                    invalid_ack_ids=invalid,
                )
            )

    async def _acknowledge(self, request: v2_pb2.AcknowledgeRequest) -> v2_pb2.AcknowledgeResponse:
        _check_ids(request.ack_ids)
        ack = self._subs.delivery.ack
        invalid = await self._settle(request.ack_ids, ack, lambda s, ids: s.ack(ids))
        return v2_pb2.AcknowledgeResponse(invalid_ack_ids=invalid)

    async def _nack(self, request: v2_pb2.NackRequest) -> v2_pb2.NackResponse:
        _check_ids(request.ack_ids)
        if request.delay_seconds > self._subs.config.delivery.max_delay_seconds:
            raise InvalidArgument("delay_seconds is over delivery.max_delay_seconds")
        failure = Failure("nack", float(request.delay_seconds) or None, request.dead_letter)
        recorded = self._recorded_nack(request.delay_seconds, request.dead_letter)
        invalid = await self._settle(request.ack_ids, recorded, lambda s, ids: s.nack(ids, failure))
        return v2_pb2.NackResponse(invalid_ack_ids=invalid)

    def _recorded_nack(self, delay: int, dead_letter: bool) -> Settle:
        """How a Nack settles a recorded id: to dead letters, later (its deadline moved to
        delay from now: it then comes as the next attempt), or as v1's nack."""
        delivery = self._subs.delivery
        if dead_letter:

            async def bury(ack_id: str) -> None:
                if not await delivery.bury(ack_id, DEAD_ON_REQUEST):
                    raise InvalidArgument(f"{ack_id} names no open delivery")

            return bury
        if delay:
            return functools.partial(delivery.extend, seconds=delay)
        return delivery.nack

    async def _modify_ack_deadline(
        self, request: v2_pb2.ModifyAckDeadlineRequest
    ) -> v2_pb2.ModifyAckDeadlineResponse:
        _check_ids(request.ack_ids)
        seconds = request.ack_deadline_seconds
        if seconds > MAX_DEADLINE:
            raise InvalidArgument(f"ack_deadline_seconds must be 0-{MAX_DEADLINE}")
        extend = functools.partial(self._subs.delivery.extend, seconds=seconds)
        invalid = await self._settle(request.ack_ids, extend, lambda s, ids: s.modify(ids, seconds))
        return v2_pb2.ModifyAckDeadlineResponse(invalid_ack_ids=invalid)

    async def _settle(self, ack_ids: Iterable[str], recorded: Settle, on_stream: Any) -> list[str]:
        """Apply a unary settlement: a stream's ids go to their stream on this node (any other
        node's stream is gone from here: invalid); recorded ids (UUIDs, as Pull and v1 hand
        out) to the bookkeeping through recorded, as v1 does."""
        invalid: list[str] = []
        by_stream: dict[StreamSession, list[str]] = {}
        records: list[str] = []
        for ack_id in ack_ids:
            owner = self._subs.streams.owner(ack_id) if is_stream_ack_id(ack_id) else None
            if owner is not None and owner.identity != caller().name:
                invalid.append(ack_id)  # only the identity that opened the stream settles it
            elif owner is not None:
                by_stream.setdefault(owner, []).append(ack_id)
            elif is_stream_ack_id(ack_id):
                invalid.append(ack_id)
            else:
                records.append(ack_id)
        if records:
            invalid += await self._settle_recorded(records, recorded)
        for session, ids in by_stream.items():
            invalid += on_stream(session, ids)
        return invalid

    async def _settle_recorded(self, ack_ids: list[str], settle: Settle) -> list[str]:
        """Settle recorded ids; those the bus never issued to the caller, and those PostgreSQL
        knows to be stale (their delivery done, or nacked: one query for them all) are invalid,
        and left alone."""
        delivery = self._subs.delivery
        mine = delivery.issued_to_caller(ack_ids)
        stale = await delivery.stale([i for i in ack_ids if i in mine])
        return [i for i in ack_ids if i not in mine or i in stale or not await _settled(settle, i)]


async def _settled(settle: Settle, ack_id: str) -> bool:
    """Whether settle took ack_id (False: an id the bus never issued, or issued to another
    identity)."""
    try:
        await settle(ack_id)
    except (InvalidArgument, PermissionDenied):  # one id of the batch, never the batch
        return False
    return True


def _received(lease: Lease, queue: str) -> v2_pb2.ReceivedMessage:
    envelope = lease.envelope
    return v2_pb2.ReceivedMessage(
        ack_id=lease.ack_id,
        message_id=envelope.message_id,
        data=envelope.body,
        attributes=envelope.attributes,
        attempt=envelope.attempt,
        publish_time=_timestamp(envelope.published_at),
        deadline=_timestamp(lease.deadline),
        queue=queue,
    )


def _recorded(record: DeliveryRecord) -> v2_pb2.ReceivedMessage:
    return v2_pb2.ReceivedMessage(
        ack_id=record.id,
        message_id=record.message_id,
        data=record.body,
        attributes=record.attributes,
        attempt=record.attempt,
        publish_time=_timestamp(record.published_at),
        deadline=_timestamp(record.deadline),
        queue=record.queue,
    )


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    whole = int(seconds)
    return Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def _check_ids(*lists: Sequence[str]) -> None:
    """At most MAX_IDS ids, none longer than any id the bus hands out (an invalid id is sent
    back: a long one must not make the answer, or what waits to be sent, large)."""
    if sum(len(ids) for ids in lists) > MAX_IDS:
        raise InvalidArgument(f"at most {MAX_IDS} ack ids in one request")
    if any(len(ack_id) > MAX_ACK_ID_LENGTH for ids in lists for ack_id in ids):
        raise InvalidArgument(f"an ack id is at most {MAX_ACK_ID_LENGTH} characters")


def _seconds_of(request: v2_pb2.StreamingPullRequest) -> dict[str, int] | int:
    """modify_deadline_seconds: one per id, or one for all."""
    ids, seconds = request.modify_deadline_ack_ids, request.modify_deadline_seconds
    if len(seconds) == 1:
        return _deadline(seconds[0])
    if len(seconds) != len(ids):
        raise InvalidArgument(
            "modify_deadline_seconds must hold one value, or one per modify_deadline_ack_ids"
        )
    return {ack_id: _deadline(s) for ack_id, s in zip(ids, seconds, strict=True)}


def _deadline(seconds: int) -> int:
    if seconds > MAX_DEADLINE:
        raise InvalidArgument(f"modify_deadline_seconds must be 0-{MAX_DEADLINE}")
    return seconds


async def _unavailable_when(closed: Awaitable[str]) -> None:
    reason = await closed
    raise Unavailable(f"RabbitMQ ended the stream's consumer ({reason}); open a new stream")


async def _first_done(*works: Awaitable[None]) -> None:
    """Run works side by side until the first ends; cancel the others; its error, if any,
    is the call's."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()
