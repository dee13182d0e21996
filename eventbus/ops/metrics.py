"""Prometheus metrics of one daemon, in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from .. import __version__

disable_created_metrics()  # type: ignore[no-untyped-call] # the *_created series only double what /metrics already says


MAX_QUEUE_LABELS = 2000
OTHER_QUEUES = "(other queues)"  # a label no queue name can have (validate.NAME_PATTERN)


class QueueLabels:
    """The queue label of each queue: its name for the first MAX_QUEUE_LABELS queues seen,
    OTHER_QUEUES for any further one, so a client naming a million queues cannot grow /metrics
    (and the daemon's memory) with them."""

    def __init__(self, limit: int = MAX_QUEUE_LABELS) -> None:
        self._limit = limit
        self._known: set[str] = set()

    def seen(self) -> list[str]:
        """The queues labelled by name so far (at most the limit)."""
        return list(self._known)

    def __call__(self, queue: str) -> str:
        if queue in self._known:
            return queue
        if len(self._known) < self._limit:
            self._known.add(queue)
            return queue
        return OTHER_QUEUES


class PerQueue:
    """A counter with one child per queue, labelled through QueueLabels."""

    def __init__(self, counter: Counter, label: QueueLabels) -> None:
        self._counter = counter
        self._label = label

    def labels(self, queue: str) -> Counter:
        return self._counter.labels(self._label(queue))

    def collect(self) -> Any:
        return self._counter.collect()


class Metrics:
    """The daemon's counters and gauges; /metrics renders the registry, /stats reads the values."""

    published: PerQueue
    delivered: PerQueue
    redelivered: PerQueue
    expired: PerQueue
    acked: PerQueue
    nacked: PerQueue
    republished: PerQueue
    dead_lettered: PerQueue
    given_back: PerQueue
    delayed: PerQueue
    delay_dispatched: PerQueue
    released: PerQueue
    quarantined: PerQueue

    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry()
        info = Info(
            "eventbus_build", "Version and node name of this daemon", registry=self.registry
        )
        info.info({"version": __version__, "node": node})
        self.dependency_up = Gauge(
            "eventbus_dependency_up",
            "1 while the dependency answers, else 0",
            ["dependency"],
            registry=self.registry,
        )
        self.redis_degraded = Gauge(
            "eventbus_redis_degraded",
            "1 while Redis is slow or down (the crons run on row claims alone), else 0",
            registry=self.registry,
        )
        self.grpc_requests = Counter(
            "eventbus_grpc_requests",
            "gRPC calls finished, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_in_flight = Gauge(
            "eventbus_grpc_in_flight", "gRPC calls being handled now", registry=self.registry
        )
        self.auth_refusals = Counter(
            "eventbus_auth_refusals",
            "Calls (gRPC methods, HTTP pages) refused: unauthenticated or not permitted",
            ["method", "code"],
            registry=self.registry,
        )
        self.admin_actions = Counter(
            "eventbus_admin_actions",
            "Admin calls that change something (requeue, cancel, purge), by method and identity",
            ["method", "identity"],
            registry=self.registry,
        )
        self.quota_refusals = Counter(
            "eventbus_quota_refusals",
            "Calls refused by an identity's quota (publish_rate, publish_burst, max_waiting_pulls)",
            ["identity", "quota"],
            registry=self.registry,
        )
        self.stray_asyncio_errors = Counter(
            "eventbus_stray_asyncio_errors",
            "Errors that reached the asyncio loop's exception handler (logged, not fatal)",
            registry=self.registry,
        )
        per_queue = {
            "published": "Messages published by clients",
            "delivered": "Messages handed out to subscribers",
            "redelivered": "Hand-outs of a message after its first attempt",
            "expired": "Messages dropped past their TTL before anybody got them",
            "acked": "Deliveries acked (counted when both record and ack are written)",
            "nacked": "Deliveries nacked (counted when both record and nack are written)",
            "republished": "Deliveries published again after a nack or a missed deadline",
            "dead_lettered": "Messages that became dead letters",
            "given_back": "Prefetched messages handed back to RabbitMQ after buffer_hold_seconds",
            "delayed": "Delayed messages accepted, by queue or topic",
            "delay_dispatched": "Delayed messages moved to their queue or topic when due",
            "released": "Times this node handed a queue's prefetched messages to a starving node",
            "quarantined": "Messages set aside because PostgreSQL or RabbitMQ refused them",
        }
        self.queue_label = QueueLabels()
        for name, text in per_queue.items():
            counter = Counter(f"eventbus_{name}", text, ["queue"], registry=self.registry)
            setattr(self, name, PerQueue(counter, self.queue_label))
        self.delay_lateness = Histogram(
            "eventbus_delay_lateness_seconds",
            "How long after its due time a delayed message was published",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.settlements_received = Counter(
            "eventbus_settlements_received",
            "ack and nack calls accepted by this node",
            ["outcome"],
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "eventbus_dead_letters",
            "Dead letters kept, per queue (cluster-wide)",
            ["queue"],
            registry=self.registry,
        )
        self.buffered = Gauge(
            "eventbus_buffered",
            "Prefetched messages in this node's local buffer",
            ["queue"],
            registry=self.registry,
        )
        self.buffered_bytes = Gauge(
            "eventbus_buffered_bytes",
            "Body bytes of the prefetched messages in this node's local buffer (all queues "
            "together at most amqp.buffer_max_bytes, plus one message per queue)",
            ["queue"],
            registry=self.registry,
        )
        self.backlog = Gauge(
            "eventbus_background_backlog",
            "Bookkeeping messages waiting in the internal queues (cluster-wide)",
            ["queue"],
            registry=self.registry,
        )
        self.loop_lag = Gauge(
            "eventbus_event_loop_lag_seconds",
            "How late the last periodic wake-up of the event loop came (a blocked loop shows here)",
            registry=self.registry,
        )
        self.task_failures = Counter(
            "eventbus_task_failures",
            "Failures of a background task (consumer, worker, cron, watcher), each followed by a "
            "restart",
            ["task"],
            registry=self.registry,
        )
        self.reconnects = Counter(
            "eventbus_reconnects",
            "Connections re-established after a loss, by dependency",
            ["dependency"],
            registry=self.registry,
        )
        self.broker_blocked = Gauge(
            "eventbus_broker_blocked",
            "1 while RabbitMQ blocks publishers (a memory or disk alarm), else 0",
            registry=self.registry,
        )
        self.broker_blocks = Counter(
            "eventbus_broker_blocks",
            "Times RabbitMQ started blocking publishers (memory or disk alarms)",
            registry=self.registry,
        )
        self.broker_failovers = Counter(
            "eventbus_broker_failovers",
            "Reconnects to RabbitMQ that landed on another broker of amqp.urls than the one lost",
            registry=self.registry,
        )

    def count_settled(self, counts: Iterable[tuple[str, str, int]]) -> None:
        """Count the acks and nacks now stored with their record: (queue, outcome, count)."""
        for queue, outcome, count in counts:
            counter = self.acked if outcome == "ack" else self.nacked
            counter.labels(queue).inc(count)


def label_values(metric: Any) -> dict[str, float]:
    """{"label/label": value} for every child of a counter or gauge ("" when unlabelled)."""
    values = {}
    for family in metric.collect():
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                values["/".join(sample.labels.values())] = sample.value
    return values
