"""What becomes of a message held on a stream that was nacked or missed its deadline.

The next attempt is published before the held delivery is acked, so a failure in between
leaves a copy too many, never none. Due now: straight back to its queue with attempt + 1.
After a delay: through the delay engine (the internal delay queue), as a delayed message that
keeps its id, attempt, attributes and publish time. Past the queue's max retries, or when the
subscriber asks for it: a dead letter, recorded through the internal confirm queue like any
delivery record. A message past its TTL is dropped.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..config import Config
from .envelope import DelayedMessage, DeliveryRecord, Envelope, Outgoing, internal_message
from .ids import DeliveryIds
from .operations import InternalQueues
from .policy import Cause, Policies, is_dead, retry_delay
from .publisher import Publisher, Target

RETRIES = uuid.UUID("3b9d4c1e-7f2a-4e58-9a61-0c5d8e2f7b43")  # names the rows of delayed retries
DEAD_ON_REQUEST = "nacked to dead letters by the subscriber"


@dataclass(frozen=True)
class Failure:
    """Why a held message comes back: a nack (with the delay the subscriber asked for, or None
    for the queue's own), a missed deadline, or a request to dead-letter it."""

    cause: Cause
    delay: float | None = None
    dead: bool = False


class Redelivery:
    """Publishes the next attempt (or the dead letter) of held messages (asyncio side)."""

    def __init__(
        self, config: Config, policies: Policies, publisher: Publisher, ids: DeliveryIds
    ) -> None:
        self.policies = policies
        self._internal = InternalQueues.of(config.amqp.namespace)
        self._publisher = publisher
        self._ids = ids

    async def redeliver(
        self, queue: str, envelopes: Sequence[Envelope], failure: Failure
    ) -> list[bool]:
        """Publish what comes next for each message; True for each that may now be acked
        (its next step confirmed, or nothing to publish: it expired)."""
        now = time.time()
        steps = [self.next_steps(queue, envelope, failure, now) for envelope in envelopes]
        sending = [message for step in steps for message in step]
        outcomes = iter(await self._publisher.publish_many(sending) if sending else [])
        confirmed = [[next(outcomes).status == "confirmed" for _ in step] for step in steps]
        return [all(each) for each in confirmed]

    def next_steps(
        self, queue: str, envelope: Envelope, failure: Failure, now: float
    ) -> list[tuple[Target, Outgoing]]:
        """The messages to publish for envelope's failure: its next attempt, or its dead letter
        (and a copy for the policy's dead_letter_queue); none when it expired."""
        if envelope.expired(now):
            return []
        policy = self.policies.for_queue(queue)
        if failure.dead or is_dead(policy, envelope.attempt):
            steps = [self._dead_letter(queue, envelope, failure, now)]
            if policy.dead_letter_queue and policy.dead_letter_queue != queue:
                fresh = replace(envelope, attempt=1)
                steps.append((("queue", policy.dead_letter_queue), fresh.to_amqp(now)))
            return steps
        delay = failure.delay
        if delay is None:
            delay = retry_delay(policy, envelope.attempt, failure.cause, random.random)
        following = replace(envelope, attempt=envelope.attempt + 1)
        if delay <= 0:
            return [(("queue", queue), following.to_amqp(now))]
        return self._delayed(queue, following, now + delay)

    def _delayed(
        self, queue: str, envelope: Envelope, due_at: float
    ) -> list[tuple[Target, Outgoing]]:
        """The retry as a delayed message, due at due_at; none when it expires before."""
        ttl = 0
        if envelope.expires_at is not None:
            if envelope.expires_at <= due_at:
                return []
            ttl = max(1, math.ceil(envelope.expires_at - due_at))
        delayed = DelayedMessage(
            # One row per wait: a topic message nacked by two groups waits twice. The same
            # retry sent twice (at least once) is one row.
            id=str(uuid.uuid5(RETRIES, f"{envelope.message_id}/{queue}/{envelope.attempt}")),
            message_id=envelope.message_id,
            kind="queue",
            target=queue,
            body=envelope.body,
            due_at=due_at,
            ttl_seconds=ttl,
            attributes=envelope.attributes,
            attempt=envelope.attempt,
            published_at=envelope.published_at,
        )
        return [(("queue", self._internal.delay), internal_message(delayed.encode()))]

    def _dead_letter(
        self, queue: str, envelope: Envelope, failure: Failure, now: float
    ) -> tuple[Target, Outgoing]:
        record = DeliveryRecord(
            id=self._ids.issue(),
            message_id=envelope.message_id,
            queue=queue,
            body=envelope.body,
            attempt=envelope.attempt,
            delivered_at=now,
            deadline=now,
            expires_at=envelope.expires_at,
            attributes=envelope.attributes,
            published_at=envelope.published_at,
            dead_reason=DEAD_ON_REQUEST if failure.dead else "",
        )
        return ("queue", self._internal.confirm), internal_message(record.encode())
