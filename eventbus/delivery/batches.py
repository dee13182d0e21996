"""v2 Publish: a batch of messages to queues and topics, now or delayed, stored in one bulk publish.

Runs on the asyncio side, like the v1 request path. The batch is checked whole first
(outbound.prepare), so a mistake stores nothing. Messages due now go straight to their queue or
topic; delayed ones to the internal delay queue, as v1's delayPublish does. All of them travel
in one write per channel with per-message confirms (Publisher.publish_many). Dedup ids are
reserved before and marked stored after (dedup.Dedup).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ..config import Config
from ..errors import CallError, Unavailable
from ..ops.metrics import Metrics
from .dedup import Dedup
from .envelope import DelayedMessage, Outgoing, internal_message, new_envelope
from .operations import InternalQueues
from .outbound import Limits, Outbound, Prepared, prepare
from .publisher import Outcome, Publisher, Target


class BatchPublishing:
    """Stores v2 publish batches (asyncio side)."""

    def __init__(
        self, config: Config, publisher: Publisher, dedup: Dedup, metrics: Metrics
    ) -> None:
        self._limits = Limits(config.amqp.namespace, config.delivery.max_delay_seconds)
        self._internal = InternalQueues.of(config.amqp.namespace)
        self._publisher = publisher
        self._dedup = dedup
        self._metrics = metrics

    async def publish(self, messages: Sequence[Outbound]) -> list[Prepared]:
        """Store every message of the batch; returns them with their ids, duplicates marked.
        Waits for RabbitMQ's confirms (and PostgreSQL's answer when dedup ids are set)."""
        batch = prepare(messages, self._limits)
        await self._declare_targets(batch)
        await self._dedup.reserve(batch)
        fresh = [m for m in batch if not m.duplicate]
        now = time.time()
        outcomes = await self._publisher.publish_many([self._amqp(m, now) for m in fresh])
        stored = [m for m, o in zip(fresh, outcomes, strict=True) if o.status == "confirmed"]
        await self._dedup.mark_stored(stored)
        self._count(stored)
        failed = [(m, o) for m, o in zip(fresh, outcomes, strict=True) if o.status != "confirmed"]
        if failed:
            # One whose confirm is still pending may yet be stored: its reservation stays.
            await self._dedup.release([m for m, o in failed if o.pending is None])
            raise _failure(failed, len(batch))
        return batch

    async def _declare_targets(self, batch: list[Prepared]) -> None:
        """Declare every queue and topic of the batch before anything of it is stored: one
        RabbitMQ refuses (a queue missing where the bus may not create it, declared with other
        settings) fails the whole call with its status (NOT_FOUND, FAILED_PRECONDITION)."""
        targets = dict.fromkeys((m.kind, m.target) for m in batch)
        declared = await asyncio.gather(
            *(self._declare(kind, name) for kind, name in targets), return_exceptions=True
        )
        for error in declared:
            if isinstance(error, BaseException):
                raise error

    async def _declare(self, kind: str, name: str) -> None:
        if kind == "topic":
            await self._publisher.declare_topic(name)
        else:
            await self._publisher.declare(name)

    def _amqp(self, message: Prepared, now: float) -> tuple[Target, Outgoing]:
        if not message.delay_seconds:
            envelope = new_envelope(
                message.data, message.ttl_seconds, now, message.attributes, message.message_id
            )
            return (message.kind, message.target), envelope.to_amqp(now)
        delayed = DelayedMessage(
            id=message.message_id,
            kind=message.kind,
            target=message.target,
            body=message.data,
            due_at=now + message.delay_seconds,
            ttl_seconds=message.ttl_seconds,
            attributes=message.attributes,
            published_at=now,
        )
        return ("queue", self._internal.delay), internal_message(delayed.encode())

    def _count(self, stored: list[Prepared]) -> None:
        for message in stored:
            counter = self._metrics.delayed if message.delay_seconds else self._metrics.published
            counter.labels(message.target).inc()


def _failure(failed: list[tuple[Prepared, Outcome]], size: int) -> CallError:
    """The error of a batch some of whose messages were not stored: a refusal of a message as
    it is (its status, naming it), else UNAVAILABLE."""
    for message, outcome in failed:
        if outcome.status == "refused" and outcome.error is not None:
            error = outcome.error
            return type(error)(f"messages[{message.index}]: {error.message}")
    reason = failed[0][1].reason or "RabbitMQ could not take them"
    return Unavailable(
        f"{len(failed)} of {size} messages were not stored ({reason}); the others were: "
        "publish the batch again with dedup_id set to store each message once"
    )
