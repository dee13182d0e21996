"""Recent rates per queue for the admin page: this node's per-queue counters (the ones /stats and
/metrics show) sampled every SAMPLE_SECONDS, the last KEEP_SAMPLES rates kept.

Memory is bounded whatever the number of queues: at most max_queues queues are tracked, each in a
fixed ring of floats. A queue seen once the table is full takes the place of one that has been
idle (no counter moved) for the whole window, or else is not tracked; the node's totals count
every queue either way.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from .metrics import Metrics, label_values

SAMPLE_SECONDS = 10.0
KEEP_SAMPLES = 90  # 15 minutes
MAX_QUEUES = 500  # each about 2 KiB
SERIES = ("published", "delivered", "acked")
TOTAL = ""  # the node's totals, kept beside the queues (no queue has an empty name)

Readings = Mapping[str, Mapping[str, float]]
"""{series: {queue: counter value}}"""


@dataclass(frozen=True)
class Rates:
    """One queue's (or the totals') rates in messages a second, oldest first, each series
    KEEP_SAMPLES long; NaN where nothing was sampled yet."""

    every: float
    series: dict[str, list[float]]

    def latest(self, name: str) -> float | None:
        """The last sampled rate of a series, None before the second sample."""
        for value in reversed(self.series[name]):
            return None if math.isnan(value) else value
        return None


class Ring:
    """A queue's last counter values and its rates, in one preallocated array per series."""

    def __init__(self, size: int) -> None:
        self.rates = {name: array("d", [math.nan] * size) for name in SERIES}
        self.last: dict[str, float] = {}
        self.idle_since = 0  # samples since a counter last moved

    def record(self, slot: int, values: Mapping[str, float], seconds: float | None) -> None:
        """Put this sample's rates in slot: counter deltas over seconds (None: first sample)."""
        moved = False
        for name in SERIES:
            value = values.get(name, 0.0)
            before = self.last.get(name)
            rate = math.nan
            if before is not None and seconds:
                rate = max(value - before, 0.0) / seconds
                moved = moved or rate > 0
            self.rates[name][slot] = rate
            self.last[name] = value
        self.idle_since = 0 if moved else self.idle_since + 1


class History:
    """The sampler and what it kept; run() samples, rates() reads."""

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        max_queues: int = MAX_QUEUES,
        keep: int = KEEP_SAMPLES,
        every: float = SAMPLE_SECONDS,
    ) -> None:
        self._metrics = metrics
        self.max_queues = max_queues
        self.keep = keep
        self.every = every
        self._rings: dict[str, Ring] = {TOTAL: Ring(keep)}
        self._slot = -1  # where the latest sample went
        self._sampled_at: float | None = None
        self.untracked = 0  # queues seen at the latest sample but not tracked

    async def run(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Sample the counters every `every` seconds, forever."""
        assert self._metrics is not None
        while True:
            self.sample(read(self._metrics), clock())
            await trio.sleep(self.every)

    def sample(self, readings: Readings, now: float) -> None:
        """Take one sample of the counters at time now (seconds, any monotonic origin)."""
        seconds = None if self._sampled_at is None else now - self._sampled_at
        self._sampled_at = now
        self._slot = (self._slot + 1) % self.keep
        by_queue: dict[str, dict[str, float]] = {}
        for name in SERIES:
            for queue, value in readings.get(name, {}).items():
                by_queue.setdefault(queue, {})[name] = value
        totals = {n: sum(q.get(n, 0.0) for q in by_queue.values()) for n in SERIES}
        self._rings[TOTAL].record(self._slot, totals, seconds)
        self.untracked = 0
        for queue in by_queue.keys() - self._rings.keys():
            if self._make_room(queue) is None:
                self.untracked += 1
        for queue, ring in self._rings.items():
            if queue != TOTAL:  # a queue missing from readings kept its values: rate 0
                values = by_queue.get(queue, ring.last)
                ring.record(self._slot, values, seconds if ring.last else None)

    def _make_room(self, queue: str) -> Ring | None:
        """A fresh ring for queue, in place of one idle for the whole window if the table is
        full; None when every tracked queue moved within it."""
        if len(self._rings) - 1 >= self.max_queues:
            idle = next(
                (q for q, r in self._rings.items() if q and r.idle_since >= self.keep), None
            )
            if idle is None:
                return None
            del self._rings[idle]
        ring = self._rings[queue] = Ring(self.keep)
        return ring

    def tracked(self) -> list[str]:
        return sorted(q for q in self._rings if q != TOTAL)

    def rates(self, queue: str = TOTAL) -> Rates | None:
        """A queue's rates, oldest first (TOTAL: the node's); None for a queue not tracked."""
        ring = self._rings.get(queue)
        if ring is None:
            return None
        start = self._slot + 1
        series = {
            name: [values[(start + i) % self.keep] for i in range(self.keep)]
            for name, values in ring.rates.items()
        }
        return Rates(self.every, series)


def read(metrics: Metrics) -> dict[str, dict[str, float]]:
    """This node's per-queue counters of every series, as /stats reports them."""
    return {name: label_values(getattr(metrics, name)) for name in SERIES}
