"""Per-queue retry policies as pure decisions: which policy a queue follows, how long a delivery
that was nacked or missed its ack deadline waits before it comes again, and when it is a dead
letter instead.

A queue follows the first [queues."GLOB"] table of config.toml whose glob matches its name
(fnmatch, case-sensitive; * matches dots too), else the [delivery] default, which keeps the bus's
fixed behaviour: a nack comes back after delivery.nack_redelivery_delay_seconds, a missed
deadline at once.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..config import Config, DeliveryConfig, QueuePolicyConfig

CACHE_SIZE = 10_000  # queue names are the clients' choice: at most this many lookups remembered
JITTER = 0.1  # a backoff is drawn within ±10 % of its nominal value
MAX_DOUBLINGS = 1023  # beyond it 2.0 ** n overflows; attempts stay far below (max_retries <= 1000)

Cause = Literal["nack", "deadline"]


@dataclass(frozen=True)
class Policy:
    """How one queue's deliveries are retried.

    fixed_nack_delay_seconds is set for the [delivery] default alone: a nack then waits that long
    and a missed deadline not at all, without backoff or jitter (the backoff fields are unused).
    """

    ack_deadline_seconds: int
    max_retries: int
    backoff_min_seconds: float = 0.0
    backoff_max_seconds: float = 0.0
    dead_letter_queue: str | None = None  # dead letters are also published there
    fixed_nack_delay_seconds: float | None = None
    glob: str | None = None  # the [queues."GLOB"] table it comes from; None: [delivery]


def default_policy(delivery: DeliveryConfig) -> Policy:
    """The policy of queues no glob matches: [delivery]'s keys, as the bus has always used them."""
    return Policy(
        delivery.ack_deadline_seconds,
        delivery.max_retries,
        fixed_nack_delay_seconds=delivery.nack_redelivery_delay_seconds,
    )


def queue_policy(table: QueuePolicyConfig) -> Policy:
    """The policy of one [queues."GLOB"] table."""
    return Policy(
        table.ack_deadline_seconds,
        table.max_retries,
        table.backoff_min_seconds,
        table.backoff_max_seconds,
        table.dead_letter_queue,
        glob=table.glob,
    )


class Policies:
    """Every queue's policy under one configuration; one object the whole daemon reads, whose
    tables a reload replaces in place."""

    def __init__(self, config: Config) -> None:
        self.replace(config)

    def replace(self, config: Config) -> None:
        """Follow config's [delivery] and [queues."GLOB"] tables from now on."""
        self.default = default_policy(config.delivery)
        self._globs = [(table.glob, queue_policy(table)) for table in config.queues]
        self._lookup = functools.lru_cache(maxsize=CACHE_SIZE)(self._match)
        floors = [float(config.delivery.nack_redelivery_delay_seconds)]
        floors += [table.backoff_min_seconds * (1 - JITTER) for table in config.queues]
        self.nack_floor = min(floors)  # the shortest wait any policy gives a nacked delivery

    def for_queue(self, name: str) -> Policy:
        """The policy of the first glob, in file order, that matches name; else the default."""
        return self._lookup(name) if self._globs else self.default

    def _match(self, name: str) -> Policy:
        for glob, policy in self._globs:
            if fnmatch.fnmatchcase(name, glob):
                return policy
        return self.default


def retry_delay(policy: Policy, attempt: int, cause: Cause, random: Callable[[], float]) -> float:
    """Seconds a delivery that failed on attempt (1: the first delivery) waits before attempt + 1.

    With a queue policy: backoff_min_seconds * 2^(attempt-1), capped at backoff_max_seconds, then
    spread by ±10 % with random() (uniform in [0, 1)), so it may end up to 10 % over the cap.
    With the default: nack_redelivery_delay_seconds after a nack, 0 after a missed deadline.
    """
    if policy.fixed_nack_delay_seconds is not None:
        return float(policy.fixed_nack_delay_seconds) if cause == "nack" else 0.0
    return backoff(policy, attempt) * (1 + JITTER * (2 * random() - 1))


def backoff(policy: Policy, attempt: int) -> float:
    """A queue policy's delay after a failed attempt, before jitter: doubling, capped."""
    doublings = min(max(attempt, 1) - 1, MAX_DOUBLINGS)
    # may overflow to infinity for a large minimum, which the cap then brings back
    return min(policy.backoff_min_seconds * 2.0**doublings, policy.backoff_max_seconds)


def is_dead(policy: Policy, attempt: int) -> bool:
    """Whether the delivery that failed on attempt was the last one allowed (max_retries + 1
    deliveries in all), so the message becomes a dead letter instead of coming again."""
    return attempt >= policy.max_retries + 1
