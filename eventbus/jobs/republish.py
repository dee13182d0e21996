"""The republish job: deliveries that were nacked, or not acked by their deadline, come back.

Each due delivery is published again to its own queue as a new attempt, or, past its queue's
max_retries, kept as a dead letter (and a copy published to its policy's dead_letter_queue);
a message past its TTL is dropped. When a delivery is due follows its queue's retry policy
(eventbus.delivery.policy): the claim takes every delivery nacked at least as long ago as the
shortest wait any policy gives, and every missed deadline; one whose own wait has not passed is
put back, claimed by nobody until then. Its jitter is drawn from its id, so it is the same on
every node and every look. A dead letter whose copy RabbitMQ cannot take now waits like a retry
and is decided again later. A retry that
RabbitMQ (or its client library) refuses becomes a dead letter with the reason; one RabbitMQ
cannot take now (its queue full, say) is due again after a back-off; the others of the batch, and
the next batches, go on. Only a batch RabbitMQ took none of ends the tick. A retry sent but not
confirmed in time on a connection still open stays claimed, never sent twice, until its
confirmation resolves (eventbus.unconfirmed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..backends.store import Store
from ..config import Config, DeliveryConfig
from ..delivery.envelope import Envelope, Marker, Outgoing, internal_message
from ..delivery.policy import Policies, Policy, is_dead, retry_delay
from ..delivery.publisher import Outcome, Publisher, Target
from ..errors import CallError, Unavailable
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog
from . import ledger
from .ledger import DueDelivery
from .unconfirmed import Unconfirmed

logger = logging.getLogger(__name__)
ratelog = RateLimitedLog(logger)

BATCH = 1000
CLEAN_EVERY_SECONDS = 30.0
CLEAN_LIMIT = 10_000
KEEP_DONE_SECONDS = 24 * 3600.0


def seeded_jitter(delivery_id: str) -> float:
    """A delivery's jitter draw, uniform in [0, 1): drawn once, from its id, so every node and
    every later look finds the same due time for it."""
    digest = hashlib.blake2b(delivery_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class RetryRules:
    """What the republish job decides by: each queue's policy, the shortest wait any policy gives
    a nacked delivery (the claim's lower bound), and how a delivery's jitter is drawn."""

    policies: Policies
    jitter: Callable[[str], float] = seeded_jitter

    @classmethod
    def of(cls, config: Config, policies: Policies | None = None) -> RetryRules:
        """The rules of config; policies, when given, must be Policies(config)."""
        return cls(policies or Policies(config))

    @property
    def nack_floor(self) -> float:
        """The policies' shortest wait for a nack, so a reload of them moves it too."""
        return self.policies.nack_floor

    def due_at(self, delivery: DueDelivery, policy: Policy) -> float:
        """When delivery may come again: when it failed plus its policy's wait; -inf when the
        claim has waited that long already (a wait no longer than the claim's lower bound)."""
        draw = self.jitter(delivery.id)
        wait = retry_delay(policy, delivery.attempt, delivery.cause, lambda: draw)
        floor = self.nack_floor if delivery.cause == "nack" else 0.0
        if wait <= floor:
            return -math.inf
        return delivery.failed_at.timestamp() + wait


@dataclass
class Plan:
    """What to do with a batch of due deliveries."""

    outcomes: dict[str, str] = field(default_factory=dict)  # delivery id -> outcome
    retries: list[tuple[str, Envelope]] = field(default_factory=list)  # (queue, next attempt)
    retried: list[DueDelivery] = field(default_factory=list)  # what each retry is of
    dead: list[DueDelivery] = field(default_factory=list)
    copies: list[tuple[str, Envelope]] = field(default_factory=list)  # (dead_letter_queue, copy)
    copied: list[DueDelivery] = field(default_factory=list)  # the dead delivery of each copy
    postponed: dict[str, float] = field(default_factory=dict)  # delivery id -> when due


def plan(
    due: Sequence[DueDelivery], now: float, max_retries: int = 0, *, rules: RetryRules | None = None
) -> Plan:
    """Decide each claimed delivery's fate, in this order: expired (past its TTL); dead (its
    queue's policy allows no more deliveries), with a copy for the policy's dead_letter_queue
    unless that is its own queue; retried, once due; else postponed to when it is due. Without
    rules every queue follows [delivery] with max_retries."""
    if rules is None:
        rules = RetryRules.of(Config(delivery=DeliveryConfig(max_retries=max_retries)))
    result = Plan()
    for delivery in due:
        _decide(result, delivery, now, rules)
    return result


def _decide(result: Plan, delivery: DueDelivery, now: float, rules: RetryRules) -> None:
    envelope = Envelope(
        delivery.message_id,
        delivery.body,
        delivery.attempt + 1,
        delivery.expires_at,
        delivery.attributes,
        delivery.published_at,
    )
    policy = rules.policies.for_queue(delivery.queue)
    if envelope.expired(now):
        result.outcomes[delivery.id] = "expired"
    elif is_dead(policy, delivery.attempt):
        result.outcomes[delivery.id] = "dead"
        result.dead.append(delivery)
        if policy.dead_letter_queue and policy.dead_letter_queue != delivery.queue:
            result.copies.append((policy.dead_letter_queue, replace(envelope, attempt=1)))
            result.copied.append(delivery)
    elif (due_at := rules.due_at(delivery, policy)) > now:
        result.postponed[delivery.id] = due_at
    else:
        result.outcomes[delivery.id] = "retried"
        result.retries.append((delivery.queue, envelope))
        result.retried.append(delivery)


@dataclass
class Settled:
    """A planned batch once its retries were published: what the ledger records."""

    outcomes: dict[str, str]  # delivery id -> outcome, for the deliveries that are done
    dead: list[tuple[DueDelivery, str | None]]  # with the reason when not the usual one
    released: list[str]  # delivery ids RabbitMQ could not take now: due again after a back-off
    republished: list[str]  # queue of each confirmed retry
    waiting: str = ""  # why some were released
    # retries sent but not confirmed yet, with their confirmation: they stay claimed
    unconfirmed: list[tuple[str, asyncio.Future[Any]]] = field(default_factory=list)


def settle(decided: Plan, published: list[Outcome]) -> Settled:
    """Apply the publishing outcomes of the retries, then of the dead letters' copies, to a
    plan."""
    result = Settled(dict(decided.outcomes), [(d, None) for d in decided.dead], [], [])
    retries, copies = published[: len(decided.retried)], published[len(decided.retried) :]
    for delivery, outcome in zip(decided.copied, copies, strict=True):
        _settle_copy(result, delivery, outcome)
    for delivery, outcome in zip(decided.retried, retries, strict=True):
        if outcome.status == "confirmed":
            result.republished.append(delivery.queue)
        elif outcome.status == "refused":
            result.outcomes[delivery.id] = "dead"
            result.dead.append((delivery, f"RabbitMQ refused its retry: {outcome.reason}"))
        elif outcome.pending is not None:
            del result.outcomes[delivery.id]
            result.unconfirmed.append((delivery.id, outcome.pending))
            result.waiting = outcome.reason
        else:
            del result.outcomes[delivery.id]
            result.released.append(delivery.id)
            result.waiting = outcome.reason
    return result


def _settle_copy(result: Settled, delivery: DueDelivery, outcome: Outcome) -> None:
    """A dead letter whose copy RabbitMQ could not take now is not recorded yet: released like a
    retry, it is decided (and copied) again later. One whose copy was refused stays a dead
    letter, kept in PostgreSQL alone."""
    if outcome.status == "refused":
        ratelog.warning(
            f"dead letter copy {delivery.queue}",
            "dead letter: the copy of message %s of queue %s was refused: %s",
            delivery.message_id,
            delivery.queue,
            outcome.reason,
        )
    elif outcome.status == "unavailable":
        del result.outcomes[delivery.id]
        result.dead = [(d, why) for d, why in result.dead if d.id != delivery.id]
        result.released.append(delivery.id)
        result.waiting = outcome.reason


class Republisher:
    """One node's republish job; several nodes may run it, row claims keep them apart."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        config: DeliveryConfig,
        metrics: Metrics,
        claim_seconds: float,
        settlements_queue: str,
        rules: RetryRules | None = None,
    ) -> None:
        """rules: each queue's retry policy; without them every queue follows config."""
        self._settlements_queue = settlements_queue
        self._store = store
        self._publisher = publisher
        self._rules = rules or RetryRules.of(Config(delivery=config))
        self._metrics = metrics
        self._last_clean = 0.0
        self._claim_seconds = claim_seconds
        self._unconfirmed = Unconfirmed()

    async def tick(self) -> None:
        """Move every due delivery, batch by batch; now and then forget finished ones."""
        await self._mark_settlements()
        while await self._move_batch() == BATCH:
            await self.settle_unconfirmed()  # a long tick renews their claims too
        if time.monotonic() - self._last_clean > CLEAN_EVERY_SECONDS:
            await ledger.clean(self._store, CLEAN_LIMIT, KEEP_DONE_SECONDS)
            self._last_clean = time.monotonic()

    async def _mark_settlements(self) -> None:
        """Publish a marker into the settlements queue: once it is applied, the deadlines up to
        now may be acted on, also when no ack came meanwhile to show that the queue moved."""
        marker = internal_message(Marker(time.time()).encode())
        try:
            await self._publisher.to_queue(self._settlements_queue, marker)
        except CallError as error:
            ratelog.info("settlements marker", "republish: no marker this tick (%s)", error.message)

    async def _move_batch(self) -> int:
        token = ledger.new_token()
        floor = self._rules.nack_floor
        due = await ledger.claim_due(self._store, token, BATCH, floor, self._claim_seconds)
        if not due:
            return 0
        now = time.time()
        decided = plan(due, now, rules=self._rules)
        if decided.postponed:
            await ledger.postpone(self._store, token, decided.postponed)
        messages: list[tuple[Target, Outgoing]] = [
            (("queue", queue), envelope.to_amqp(now))
            for queue, envelope in decided.retries + decided.copies
        ]
        generation = self._publisher.generation
        settled = settle(decided, await self._publisher.to_targets(messages))
        for delivery_id, confirmation in settled.unconfirmed:  # held even if finishing fails
            self._unconfirmed.add(token, delivery_id, confirmation, generation)
        await ledger.finish(self._store, token, settled.outcomes, settled.dead, settled.released)
        self._count(settled)
        waiting = len(settled.released) + len(settled.unconfirmed)
        if waiting and waiting == len(decided.retried) + len(decided.copied):
            # RabbitMQ took none of them: it is away, and would take no more this tick
            raise Unavailable(f"{waiting} retries wait: {settled.waiting}")
        return len(due)

    async def settle_unconfirmed(self) -> None:
        """(Every interval, the lock held or not, and between batches.) Finish the retries
        RabbitMQ confirmed meanwhile, give back those whose connection closed first (they go
        again), and keep holding the rest."""
        for resolved in self._unconfirmed.resolve(self._publisher.generation):
            token = resolved.token
            if resolved.confirmed:
                queues = await ledger.finish_retried(self._store, token, resolved.confirmed)
                self._unconfirmed.forget(token, resolved.confirmed)
                for queue in queues:
                    self._metrics.republished.labels(queue).inc()
            if resolved.failed:
                await ledger.release(self._store, token, resolved.failed)
                self._unconfirmed.forget(token, resolved.failed)
            if resolved.waiting:
                await ledger.hold(self._store, token, resolved.waiting, self._claim_seconds)

    def _count(self, settled: Settled) -> None:
        for queue in settled.republished:
            self._metrics.republished.labels(queue).inc()
        for delivery, reason in settled.dead:
            self._metrics.dead_lettered.labels(delivery.queue).inc()
            ratelog.info(
                f"dead letter {delivery.queue}",
                "dead letter: message %s of queue %s after %d deliveries%s",
                delivery.message_id,
                delivery.queue,
                delivery.attempt,
                f" ({reason})" if reason else "",
            )
