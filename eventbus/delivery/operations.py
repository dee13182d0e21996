"""The request path: publish, delayed publish, subscribe, ack, nack, for queues and topics.

These run on the asyncio side of the seam, straight from the gRPC handlers to aio-pika, so a
call costs no task or seam crossing of its own; what they decide is plain code (validate,
envelope). subscribe hands a message out only after its delivery record (id, queue, body,
attempt, deadline) is confirmed in the internal confirm queue; only then is the AMQP delivery
acked. From then on the bookkeeping in PostgreSQL and the republish cron own the message until
it is acked. A message a v1 reply cannot carry (its data is not UTF-8: published through v2)
is not handed out: its record, sent the same way, makes it a dead letter, and the pull goes on.

While RabbitMQ blocks publishers (a memory or disk alarm) records and settlements cannot travel
through the internal queues: they are written straight to PostgreSQL instead, so pulls and acks
of messages already queued go on. A hand-out whose record may have been sent but was never
confirmed is marked returned in PostgreSQL before its message goes back to the queue, so the
record, should it arrive, brings no second copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from ..backends.broker import Blocked, Broker, BrokerUnavailable
from ..backends.pgerrors import OUTAGE
from ..backends.retry import describe
from ..backends.store import Queries
from ..config import Config
from ..errors import InvalidArgument, PermissionDenied, Unavailable
from ..jobs import ledger
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from ..security.access import caller
from . import validate
from .consumer import Buffered, Consumers
from .envelope import (
    DeadlineChange,
    DelayedMessage,
    DeliveryRecord,
    Envelope,
    Outcome,
    Settlement,
    internal_message,
    new_envelope,
    pack_records,
    pack_settlements,
)
from .ids import DeliveryIds
from .packing import Packer
from .policy import Policies
from .publisher import Publisher, Target

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)

PULL_BYTES = 3 * 1024 * 1024  # of bodies in one Pull reply: gRPC clients take 4 MiB by default
LEDGER_TIMEOUT = 2.0  # a record or settlement written straight to PostgreSQL
BURY_WAIT = 2.0  # seconds a dead-lettering Nack waits for its delivery's record to be stored
BURY_LOOKS = 5
RECORD_PACKS = 2  # packs of delivery records on their way to the confirm queue at once
NOT_UTF8 = "data is not UTF-8: a v1 subscriber cannot receive it"


@dataclass(frozen=True)
class InternalQueues:
    """The bus's own durable queues, inside amqp.namespace."""

    confirm: str
    ack: str
    delay: str

    @classmethod
    def of(cls, namespace: str) -> InternalQueues:
        return cls(f"{namespace}.confirm", f"{namespace}.ack", f"{namespace}.delay")

    def all(self) -> list[str]:
        return [self.confirm, self.ack, self.delay]


class Delivery:
    """Direct-queue operations, shared by the gRPC services (asyncio side)."""

    def __init__(
        self,
        config: Config,
        broker: Broker,
        publisher: Publisher,
        consumers: Consumers,
        metrics: Metrics,
        ids: DeliveryIds,
        ledger_direct: Queries,
        policies: Policies,
    ) -> None:
        self.config = config
        self._ledger = ledger_direct
        self._ids = ids
        self.namespace = config.amqp.namespace
        self.internal = InternalQueues.of(self.namespace)
        # Settlements go one pack after another: the ack queue holds them in the order their
        # acks and nacks were answered.
        self._records = Packer(self._send_records, in_flight=RECORD_PACKS, size=_record_size)
        self._settlements = Packer(self._send_settlements, in_flight=1)
        self._broker = broker
        self._publisher = publisher
        self._consumers = consumers
        self._metrics = metrics
        self._policies = policies

    async def publish(self, queue: str, data: str, ttl_seconds: int) -> None:
        """Publish one message; returns once RabbitMQ confirmed it."""
        validate.name("queue", queue, self.namespace)
        validate.data(data)
        validate.ttl(ttl_seconds)
        now = time.time()
        message = new_envelope(data.encode(), ttl_seconds, now).to_amqp(now)
        await self._publisher.publish(queue, message)
        self._metrics.published.labels(queue).inc()

    async def publish_topic(self, topic: str, data: str, ttl_seconds: int) -> None:
        """Publish one message to every queue bound to topic; returns once confirmed."""
        validate.name("topic", topic, self.namespace)
        validate.data(data)
        validate.ttl(ttl_seconds)
        now = time.time()
        message = new_envelope(data.encode(), ttl_seconds, now).to_amqp(now)
        await self._publisher.publish_topic(topic, message)
        self._metrics.published.labels(topic).inc()

    async def delay_publish(
        self, target: Target, data: str, delay_seconds: int, ttl_seconds: int
    ) -> None:
        """Publish to a queue or topic once delay_seconds have passed (0: now). Returns once the
        delayed message is confirmed in the internal delay queue."""
        kind, name = target
        validate.name(kind, name, self.namespace)
        validate.data(data)
        validate.ttl(ttl_seconds)
        validate.delay(delay_seconds, self.config.delivery.max_delay_seconds)
        if delay_seconds == 0:
            await self._publish_now(target, data, ttl_seconds)
            return
        if kind == "queue":
            await self._publisher.declare(name)  # NotFound when it must exist already
        now = time.time()
        delayed = DelayedMessage(
            str(uuid.uuid4()),
            kind,
            name,
            data.encode(),
            now + delay_seconds,
            ttl_seconds,
            published_at=now,
        )
        await self._publisher.publish(self.internal.delay, internal_message(delayed.encode()))
        self._metrics.delayed.labels(name).inc()

    async def _publish_now(self, target: Target, data: str, ttl_seconds: int) -> None:
        kind, name = target
        if kind == "topic":
            await self.publish_topic(name, data, ttl_seconds)
        else:
            await self.publish(name, data, ttl_seconds)

    async def subscribe_topic(self, topic: str, queue: str) -> DeliveryRecord:
        """Pull one message of the subscriber group queue bound to topic (bound on first use)."""
        validate.name("topic", topic, self.namespace)
        validate.name("queueName", queue, self.namespace)
        await self._publisher.bind(queue, topic)
        return await self._pull(queue)

    async def subscribe(self, queue: str) -> DeliveryRecord:
        """Pull one message of queue; waits until one arrives (the caller's deadline bounds it)."""
        validate.name("queue", queue, self.namespace)
        return await self._pull(queue)

    async def _pull(self, queue: str) -> DeliveryRecord:
        """Hand out the next message a v1 subscriber can take: one past its TTL is dropped, one
        whose data is not UTF-8 (a v1 reply's data is a string) is dead-lettered."""
        if not self._broker.connected:
            raise Unavailable(f"RabbitMQ at {self._broker.address} is not connected")
        while True:
            item = await self._consumers.take(queue)
            envelope = Envelope.from_amqp(item.message)
            if envelope.expired(time.time()):
                await item.settle(ack=True)  # past its TTL: dropped, never handed out
                self._metrics.expired.labels(queue).inc()
            elif not utf8(envelope.body):
                await self._hand_out(queue, item, envelope, dead_reason=NOT_UTF8)
            else:
                return await self._hand_out(queue, item, envelope)

    async def _hand_out(
        self, queue: str, item: Buffered, envelope: Envelope, dead_reason: str | None = None
    ) -> DeliveryRecord:
        """Record a delivery of the message, then ack it to RabbitMQ; with dead_reason, the
        record dead-letters it instead (it is not handed out)."""
        now = time.time()
        record = DeliveryRecord(
            id=self._ids.issue(caller().name),
            message_id=envelope.message_id,
            queue=queue,
            body=envelope.body,
            attempt=envelope.attempt,
            delivered_at=now,
            deadline=now + self._policies.for_queue(queue).ack_deadline_seconds,
            expires_at=envelope.expires_at,
            attributes=envelope.attributes,
            published_at=envelope.published_at,
            dead_reason=dead_reason,
        )
        # From here the message belongs to this call: the recording finishes even if the caller
        # leaves (the message then comes back after its deadline).
        recording = asyncio.ensure_future(self._record(item, record))
        try:
            await asyncio.shield(recording)
        except asyncio.CancelledError:
            recording.add_done_callback(_log_failure)
            raise
        return record

    async def _record(self, item: Buffered, record: DeliveryRecord) -> None:
        try:
            await self._keep_record(record)
        except BaseException:
            await item.settle(ack=False)
            raise
        # False: its channel failed meanwhile, and RabbitMQ may deliver the message again (or
        # may have taken the ack: which, cannot be told, so it is handed out, at least once)
        await item.settle(ack=True)
        self._count(record)

    def _count(self, record: DeliveryRecord) -> None:
        if record.dead_reason is not None:
            self._metrics.dead_lettered.labels(record.queue).inc()
            ratelog.info(
                f"dead letter {record.queue}",
                "message %s of queue %s dead-lettered: %s",
                record.message_id,
                record.queue,
                record.dead_reason,
            )
            return
        self._metrics.delivered.labels(record.queue).inc()
        if record.attempt > 1:
            self._metrics.redelivered.labels(record.queue).inc()

    async def _keep_record(self, record: DeliveryRecord) -> None:
        """Send the record through the confirm queue, packed with those of other hand-outs;
        returns once it is confirmed (or stored, see _send_records)."""
        await self._records.put(record)

    async def _send_records(self, records: list[DeliveryRecord]) -> None:
        """Send records through the confirm queue as one message, or while RabbitMQ blocks
        publishers, write them to PostgreSQL. Records that may have been sent although this
        failed are settled as returned first, so they are never retried."""
        try:
            try:
                await self._publisher.publish(self.internal.confirm, pack_records(records))
            except Blocked:
                await self._write_directly("delivery records", ledger.write_records, records)
        except BrokerUnavailable:
            raise  # not connected: nothing was sent
        except BaseException:
            await self._mark_returned(records)  # sent, or stored directly, they may be there
            raise

    async def _mark_returned(self, records: list[DeliveryRecord]) -> None:
        """Best effort, within LEDGER_TIMEOUT: PostgreSQL may be away too."""
        now = time.time()
        returned = [Settlement(record.id, "returned", now) for record in records]
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT):
                await ledger.write_settlements(self._ledger, returned)
        except Exception as error:
            logger.info(
                "%d failed hand-out(s), of %s first, could not be marked returned (%s); they "
                "may come twice",
                len(records),
                records[0].message_id,
                describe(error),
            )

    async def _write_directly(self, what: str, write: Any, rows: list[Any]) -> None:
        """Write bookkeeping rows straight to PostgreSQL, within LEDGER_TIMEOUT, while RabbitMQ
        blocks publishers, and count the acks and nacks that settles."""
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT):
                counts = await write(self._ledger, rows)
        except OUTAGE as error:
            raise Unavailable(
                f"RabbitMQ is blocking publishers ({self._broker.blocked}) and PostgreSQL could "
                f"not take the {what} instead: {describe(error)}"
            ) from None
        self._metrics.count_settled(counts)

    async def pull_many(self, queue: str, most: int, wait: float) -> list[DeliveryRecord]:
        """v2 Pull: up to most messages of queue, each recorded as v1's subscribe records it
        (any data: v2 carries bytes). Waits up to wait seconds for the first; the rest are what
        this node has buffered already."""
        if not self._broker.connected:
            raise Unavailable(f"RabbitMQ at {self._broker.address} is not connected")
        await self._consumers.started(queue)  # outside the wait: a wait of 0 must not stop it
        first = await self._take_within(queue, wait)
        if first is None:
            return []
        room = PULL_BYTES - first.size
        items = [first, *self._consumers.take_ready(queue, most - 1, room)]
        # From here the messages belong to this call: they are recorded even if it is cancelled
        # (and then come back after their deadline), never left unacked in hand.
        giving = asyncio.ensure_future(self._give_all(queue, items))
        return await asyncio.shield(giving)

    async def _give_all(self, queue: str, items: list[Buffered]) -> list[DeliveryRecord]:
        given = await asyncio.gather(*(self._give(queue, i) for i in items), return_exceptions=True)
        records = [r for r in given if isinstance(r, DeliveryRecord)]
        failures = [r for r in given if isinstance(r, BaseException)]
        if failures and not records:
            raise failures[0]  # each failed hand-out put its message back
        return records

    async def _take_within(self, queue: str, wait: float) -> Buffered | None:
        try:
            async with asyncio.timeout(wait):
                return await self._consumers.take(queue)
        except TimeoutError:
            return None

    async def _give(self, queue: str, item: Buffered) -> DeliveryRecord | None:
        envelope = Envelope.from_amqp(item.message)
        if envelope.expired(time.time()):
            await item.settle(ack=True)  # past its TTL: dropped, never handed out
            self._metrics.expired.labels(queue).inc()
            return None
        return await self._hand_out(queue, item, envelope)

    async def ack(self, delivery_id: str) -> None:
        await self._settle(delivery_id, "ack")

    async def nack(self, delivery_id: str) -> None:
        await self._settle(delivery_id, "nack")

    async def _settle(self, delivery_id: str, outcome: Outcome) -> None:
        issued = self._ids.check(validate.delivery_id(delivery_id), caller().name)
        await self._settlements.put(Settlement(issued, outcome, time.time()))
        self._metrics.settlements_received.labels(outcome).inc()

    async def _send_settlements(self, settlements: list[Settlement]) -> None:
        """Send settlements through the ack queue as one message, or while RabbitMQ blocks
        publishers, write them to PostgreSQL."""
        try:
            await self._publisher.publish(self.internal.ack, pack_settlements(settlements))
        except Blocked:
            await self._write_directly("settlements", ledger.write_settlements, settlements)

    async def extend(self, delivery_id: str, seconds: int) -> None:
        """v2 ModifyAckDeadline of a recorded delivery: its deadline becomes seconds from now
        (0: a nack now). Returns once the change is confirmed in the internal ack queue (or,
        while RabbitMQ blocks publishers, stored); the bookkeeping then moves the deadline if
        the delivery is still open."""
        if seconds == 0:
            await self.nack(delivery_id)
            return
        issued = self._ids.check(validate.delivery_id(delivery_id), caller().name)
        now = time.time()
        # with the acks and nacks, so the ack queue holds them all in the order answered
        await self._settlements.put(DeadlineChange(issued, "deadline", now, now + seconds))
        self._metrics.settlements_received.labels("deadline").inc()

    async def bury(self, delivery_id: str, reason: str) -> bool:
        """v2 Nack to dead letters of a recorded delivery: its record, read back from
        PostgreSQL, goes through the confirm queue again with the reason, which makes it a dead
        letter. False when PostgreSQL holds no open delivery of that id (yet: a record takes a
        moment to arrive; up to BURY_WAIT is given to it)."""
        issued = self._ids.check(validate.delivery_id(delivery_id), caller().name)
        record = await self._open_record(issued)
        if record is None:
            return False
        dead = replace(record, dead_reason=reason)
        await self._publisher.publish(self.internal.confirm, internal_message(dead.encode()))
        self._metrics.dead_lettered.labels(record.queue).inc()
        return True

    async def _open_record(self, delivery_id: str) -> DeliveryRecord | None:
        try:
            async with asyncio.timeout(BURY_WAIT):
                for _ in range(BURY_LOOKS):  # PostgreSQL is polled: no event tells
                    record = await ledger.open_delivery(self._ledger, delivery_id, time.time())
                    if record is not None:
                        return record
                    await asyncio.sleep(BURY_WAIT / BURY_LOOKS)
        except TimeoutError:
            pass
        except OUTAGE as error:
            raise Unavailable(
                f"PostgreSQL could not be asked for the delivery: {describe(error)}"
            ) from None
        return None

    async def stale(self, delivery_ids: list[str]) -> set[str]:
        """Those of delivery_ids (as sent) whose delivery PostgreSQL knows is no longer
        current: done (retried, dead, expired) or nacked. One query, within
        ledger.STALE_TIMEOUT; when PostgreSQL does not answer in time, none. Ids this bus did
        not issue are left for the settling to refuse."""
        issued = self._issued(delivery_ids)
        if not issued:
            return set()
        try:
            async with asyncio.timeout(ledger.STALE_TIMEOUT):
                known = await ledger.stale(self._ledger, list(issued))
        except OUTAGE as error:
            ratelog.info("stale ids", "ack ids taken as current, unchecked: %s", describe(error))
            return set()
        return {issued[delivery_id] for delivery_id in known}

    def issued_to_caller(self, delivery_ids: list[str]) -> set[str]:
        """Those of delivery_ids (as sent) that this bus issued to the caller's identity."""
        return set(self._issued(delivery_ids).values())

    def _issued(self, delivery_ids: list[str]) -> dict[str, str]:
        """The well-formed ids this bus issued to the caller, canonical, each to the id as
        sent."""
        issued, owner = {}, caller().name
        for delivery_id in delivery_ids:
            try:
                canonical = validate.delivery_id(delivery_id)
                issued[self._ids.check(canonical, owner, name_other_owner=False)] = delivery_id
            except (InvalidArgument, PermissionDenied):
                continue
        return issued


def utf8(body: bytes) -> bool:
    """Whether a body is UTF-8 text, as a v1 reply's data must be (ASCII is checked fastest)."""
    if body.isascii():
        return True
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


def _record_size(record: DeliveryRecord) -> int:
    return len(record.body) + 256  # its fields take about that much


def _log_failure(recording: asyncio.Future[None]) -> None:
    """A recording whose caller had left failed: the message went back to its queue."""
    error = None if recording.cancelled() else recording.exception()
    if error is not None:
        logger.info(
            "a delivery whose caller left could not be recorded (%s); requeued", describe(error)
        )
