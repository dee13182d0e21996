"""Quotas per identity: how fast it may publish, how many pulls it may keep waiting.

An identity with a publish_rate has a token bucket holding at most publish_burst messages (0:
one second's worth), refilled at publish_rate a second; a publish takes a token per message, a
v2 batch all of its tokens or none. An identity with max_waiting_pulls may have that many v1
subscribes, v2 Pulls and open StreamingPull streams at once. Past either, the call is refused
with RESOURCE_EXHAUSTED saying when to retry, also as a google.rpc.RetryInfo in the status
details; a batch larger than the burst can never pass and is INVALID_ARGUMENT.

The limits hold per node. Quotas keeps a bucket per identity of the configuration it was last
given (update() on reload drops the others) and a count per identity with pulls waiting now.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ..errors import InvalidArgument
from ..ops.metrics import Metrics
from ..ops.ratelog import RateLimitedLog

# Refusals: at most one line a minute per identity and quota.
refusals_log = RateLimitedLog(logging.getLogger(__name__))

PULL_RETRY_SECONDS = 1.0  # the hint when every pull slot is taken: nobody knows when one frees
HINT_STEP = 0.01  # hints are rounded up to this: retrying after the hint finds the tokens there
EPSILON = 1e-9  # tokens short by less than this are there (refills add floating-point dust)


class Limits(Protocol):
    """An identity's quotas: Identity and IdentityConfig both have them."""

    @property
    def name(self) -> str: ...
    @property
    def publish_rate(self) -> float: ...
    @property
    def publish_burst(self) -> int: ...
    @property
    def max_waiting_pulls(self) -> int: ...


def burst_of(rate: float, burst: int) -> int:
    """The bucket's size: publish_burst, or one second's worth when 0 (at least one message)."""
    return burst or max(1, math.ceil(rate))


@dataclass
class TokenBucket:
    """rate tokens a second, at most burst of them; tokens as of the time updated."""

    rate: float
    burst: int
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        if now > self.updated:  # a clock that went back refills nothing
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, count: int, now: float) -> float:
        """Take count tokens when there are as many: 0.0. Else take none and return the
        seconds until there will be (infinity when count is over the burst: never)."""
        if count > self.burst:
            return math.inf
        self.refill(now)
        missing = count - self.tokens
        if missing > EPSILON:
            return missing / self.rate
        self.tokens = max(0.0, self.tokens - count)
        return 0.0


def carried(old: TokenBucket | None, limits: Limits, now: float) -> TokenBucket:
    """The bucket for limits: a full one, or old's tokens (at most the new burst), so that a
    reload hands out no fresh burst."""
    burst = burst_of(limits.publish_rate, limits.publish_burst)
    if old is None:
        return TokenBucket(limits.publish_rate, burst, float(burst), now)
    old.refill(now)
    return TokenBucket(limits.publish_rate, burst, min(old.tokens, float(burst)), now)


def retry_hint(seconds: float) -> float:
    """seconds rounded up to HINT_STEP, at least HINT_STEP."""
    return max(HINT_STEP, math.ceil(seconds / HINT_STEP - EPSILON) * HINT_STEP)


class QuotaExceeded(GRPCError):
    """RESOURCE_EXHAUSTED saying when to retry, in the message and as a google.rpc.RetryInfo
    (a GRPCError, so the gate passes the details on as they are)."""

    def __init__(self, message: str, retry_after: float) -> None:
        hint = retry_hint(retry_after)
        delay = Duration()
        delay.FromNanoseconds(round(hint * 1e9))
        super().__init__(
            Status.RESOURCE_EXHAUSTED,
            f"{message}; retry in {hint:.2f} s",
            [RetryInfo(retry_delay=delay)],
        )
        self.retry_after = hint


class Quotas:
    """The node's quotas of every identity; the daemon holds one and updates it on reload."""

    def __init__(
        self,
        identities: Iterable[Limits] = (),
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._limits: dict[str, Limits] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._waiting: dict[str, int] = {}  # only identities with pulls waiting now
        self.update(identities)

    def update(self, identities: Iterable[Limits]) -> None:
        """Apply the configuration's identities (Identity or IdentityConfig): an identity that
        stays keeps its bucket's tokens, a new one starts with a full bucket, a removed one's
        bucket and refusal counts are dropped. Pulls waiting now stay counted until they end."""
        now = self._clock()
        limits = {identity.name: identity for identity in identities}
        self._buckets = {
            name: carried(self._buckets.get(name), limit, now)
            for name, limit in limits.items()
            if limit.publish_rate > 0
        }
        for name in self._limits.keys() - limits.keys():
            self._forget_refusals(name)
        self._limits = limits

    def publish(self, identity: Limits, count: int = 1) -> None:
        """Take count tokens of identity's bucket, or none: QuotaExceeded when there are fewer,
        InvalidArgument when count is over the burst."""
        bucket = self._buckets.get(identity.name)
        if bucket is None:
            return
        wait = bucket.take(count, self._clock())
        if wait == 0.0:
            return
        key = f"auth.identities.{identity.name}"
        if math.isinf(wait):
            self._count(identity.name, "publish_burst")
            raise InvalidArgument(
                f"a batch of {count} messages is over the {bucket.burst} that {key}.publish_burst "
                f"lets identity {identity.name!r} publish at once; send at most {bucket.burst} "
                "messages per call"
            )
        self._count(identity.name, "publish_rate")
        raise QuotaExceeded(
            f"identity {identity.name!r} publishes faster than {key}.publish_rate = "
            f"{bucket.rate:g} messages/s allows",
            wait,
        )

    @contextlib.contextmanager
    def waiting_pull(self, identity: Limits) -> Iterator[None]:
        """Count a pull of identity's for as long as the block runs; QuotaExceeded when
        identity has max_waiting_pulls of them already."""
        name = identity.name
        waiting = self._waiting.get(name, 0)
        limit = self._limits.get(name)
        most = limit.max_waiting_pulls if limit is not None else 0
        if most and waiting >= most:
            self._count(name, "max_waiting_pulls")
            raise QuotaExceeded(
                f"identity {name!r} has {waiting} pulls waiting, the most "
                f"auth.identities.{name}.max_waiting_pulls allows",
                PULL_RETRY_SECONDS,
            )
        self._waiting[name] = waiting + 1
        try:
            yield
        finally:
            left = self._waiting[name] - 1
            if left:
                self._waiting[name] = left
            else:
                del self._waiting[name]

    def waiting(self, name: str) -> int:
        """How many pulls identity name has waiting now."""
        return self._waiting.get(name, 0)

    def tracked(self) -> set[str]:
        """The identities Quotas keeps any state for (a bucket, or pulls waiting)."""
        return self._buckets.keys() | self._waiting.keys()

    def _count(self, name: str, quota: str) -> None:
        if self._metrics is not None:
            self._metrics.quota_refusals.labels(name, quota).inc()
        refusals_log.info(f"{name} {quota}", "quota: identity %s refused over %s", name, quota)

    def _forget_refusals(self, name: str) -> None:
        if self._metrics is None:
            return
        for quota in ("publish_rate", "publish_burst", "max_waiting_pulls"):
            with contextlib.suppress(KeyError):
                self._metrics.quota_refusals.remove(name, quota)
