"""Gauges refreshed in the background: local buffers, dead letters, bookkeeping backlog."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from ..backends import aio
from ..backends.retry import describe
from ..backends.store import Store
from ..delivery.consumer import Consumers
from ..delivery.publisher import Publisher
from .metrics import Metrics, label_values

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 5.0
PER_QUEUE_COUNTERS = (
    "published",
    "delivered",
    "redelivered",
    "expired",
    "acked",
    "nacked",
    "republished",
    "dead_lettered",
    "given_back",
)


class Gauges:
    """Keeps the gauges of one node current, and assembles the per-queue part of /stats."""

    def __init__(
        self,
        metrics: Metrics,
        store: Store,
        publisher: Publisher,
        consumers: Consumers,
        internal_queues: Sequence[str],
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._publisher = publisher
        self._consumers = consumers
        self._internal = internal_queues
        self.backlog: dict[str, int] = {}

    async def run(self) -> None:
        """Refresh every REFRESH_SECONDS forever; an unreachable dependency skips its part."""
        while True:
            await self.refresh()
            await trio.sleep(REFRESH_SECONDS)

    async def refresh(self) -> None:
        self._refresh_buffers()
        for part in (self._refresh_dead_letters, self._refresh_backlog):
            try:
                with trio.fail_after(REFRESH_SECONDS):
                    await part()
            except Exception as error:
                logger.debug("gauges: %s skipped: %s", part.__name__, describe(error))

    def _refresh_buffers(self) -> None:
        self._metrics.buffered.clear()
        for queue, size in self._consumers.buffered().items():
            self._metrics.buffered.labels(queue).set(size)

    async def _refresh_dead_letters(self) -> None:
        rows = await self._store.fetch(
            "SELECT queue, count(*) AS n FROM dead_letters GROUP BY queue"
        )
        self._metrics.dead_letters.clear()
        for row in rows:
            label = self._metrics.queue_label(row["queue"])
            self._metrics.dead_letters.labels(label).inc(row["n"])

    async def _refresh_backlog(self) -> None:
        """Messages waiting in each internal queue: passive declares on a declaring channel of
        the connection that never publishes, so they go on while RabbitMQ blocks publishers,
        and one that times out closes a channel nobody else writes on."""
        for queue in self._internal:
            count = await aio.call(self._publisher.message_count, queue)
            self.backlog[queue] = count
            self._metrics.backlog.labels(queue).set(count)

    def per_queue(self) -> dict[str, dict[str, Any]]:
        """{queue: {counter: value, ...}} from this node's metrics."""
        queues: dict[str, dict[str, Any]] = {}
        for name in PER_QUEUE_COUNTERS:
            for queue, value in label_values(getattr(self._metrics, name)).items():
                queues.setdefault(queue, {})[name] = int(value)
        for name in ("buffered", "buffered_bytes", "dead_letters"):
            for queue, value in label_values(getattr(self._metrics, name)).items():
                queues.setdefault(queue, {})[name] = int(value)
        return queues
