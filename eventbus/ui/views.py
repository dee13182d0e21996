"""What the admin page shows, as plain data: the overview (also its JSON view), a queue, a topic.

Counts come from where the v2 Admin service takes them (eventbus.jobs.admin), counters from the
daemon's /stats document itself, rates from the history sampler over the same counters, so the
page never tells another story than /stats and Admin.GetQueue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import trio

from ..api.http import Check, check_readiness
from ..backends.retry import describe
from ..backends.store import Store
from ..delivery import validate
from ..delivery.policy import Policies, Policy
from ..delivery.publisher import Publisher
from ..errors import CallError, NotFound
from ..jobs import admin
from ..ops.history import SERIES, TOTAL, History, Rates
from ..ops.metrics import Metrics
from ..security.access import Access
from . import listings, markup
from .listings import Delayed, Letter

logger = logging.getLogger(__name__)

CACHE_SECONDS = 2.0  # one overview serves every viewer for this long
PAGE_SIZE = 50  # dead letters or delayed messages on one page
LOOKUPS_AT_ONCE = 4
COUNTS = ("ready", "in_flight", "delayed", "dead_letters", "consumers")

# When the oldest delivery of each queue still in flight was handed out (as admin.COUNTS
# counts them in flight).
OLDEST = """
SELECT d.queue AS name, extract(epoch FROM now() - min(d.delivered_at)) AS age
FROM deliveries d
WHERE NOT d.done AND d.queue = ANY($1::text[]) AND NOT EXISTS (
    SELECT 1 FROM settlements s WHERE s.delivery_id = d.id AND s.outcome <> 'nack')
GROUP BY d.queue
"""


@dataclass
class Parts:
    """What the admin page reads and acts through, all the daemon's own objects."""

    node: str
    metrics: Metrics
    store: Store
    publisher: Publisher
    queues: admin.Queues
    policies: Policies
    namespace: str
    history: History
    stats: Callable[[], Awaitable[dict[str, Any]]]  # the /stats document
    checks: Mapping[str, Check]  # /readyz's
    access: Callable[[], Access | None]
    # The names the page is reached by besides localhost, the loopback addresses and the
    # machine's host name: server.http_host and [http] ui_hosts.
    hosts: tuple[str, ...] = ()


class Overview:
    """The overview document, built at most once every CACHE_SECONDS whoever asks."""

    def __init__(self, parts: Parts, clock: Callable[[], float] = time.monotonic) -> None:
        self._parts = parts
        self._clock = clock
        self._lock = trio.Lock()
        self._built: tuple[float, dict[str, Any]] | None = None

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            if self._built is None or self._clock() - self._built[0] >= CACHE_SECONDS:
                self._built = (self._clock(), await overview(self._parts))
            return self._built[1]


async def overview(parts: Parts) -> dict[str, Any]:
    """Nodes, totals and every queue's counts, counters and rates; a part that cannot be
    read is left out and named under "problems"."""
    problems: list[str] = []
    stats = await parts.stats()
    readiness = await check_readiness(parts.checks)
    counters: dict[str, dict[str, Any]] = stats["queues"]
    try:
        infos = await known_queues(parts, counters)
    except Exception as error:
        problems.append(f"queue counts unavailable: {describe(error)}")
        infos = []
    ages = await _oldest_or_none(parts.store, [i.name for i in infos], problems)
    rows = [queue_row(parts, info, counters.get(info.name, {}), ages) for info in infos]
    problems.extend(cut_short(len(rows), admin.MAX_QUEUES))
    if parts.history.untracked:
        problems.append(f"{parts.history.untracked} queues have no rate history (too many)")
    return {
        "node": stats["node"],
        "version": stats["version"],
        "nodes": nodes(stats, readiness.down, readiness.degraded, list(parts.checks)),
        "totals": totals(rows, parts.history.rates(TOTAL), stats),
        "queues": rows,
        "topics": topics(parts.publisher),
        "sample_seconds": parts.history.every,
        "problems": problems,
    }


def cut_short(shown: int, limit: int) -> list[str]:
    """The overview's notice when its queue list reached the limit a listing stops at."""
    if shown < limit:
        return []
    return [
        f"only the first {limit:,} queues by name are listed (the most a listing holds); "
        "counts and totals cover those alone: open another queue by its page, /ui/queue?name=…"
    ]


async def known_queues(parts: Parts, counters: Mapping[str, Any]) -> list[admin.QueueInfo]:
    """The queues Admin.ListQueues lists, and those this node's counters name that exist."""
    infos = await parts.queues.known()
    listed = {info.name for info in infos}
    extra = [n for n in counters if n not in listed and _queue_name(n, parts.namespace)]
    found: list[admin.QueueInfo] = []
    limiter = trio.CapacityLimiter(LOOKUPS_AT_ONCE)

    async def look(name: str) -> None:
        async with limiter:
            with contextlib.suppress(NotFound):  # a topic's name, or a queue deleted since
                found.append(await parts.queues.info(name))

    async with trio.open_nursery() as nursery:
        for name in extra[: admin.MAX_QUEUES - len(infos)]:
            nursery.start_soon(look, name)
    return sorted([*infos, *found], key=lambda info: info.name)


def _queue_name(name: str, namespace: str) -> bool:
    try:
        validate.name("queue", name, namespace)
    except CallError:
        return False
    return True


async def oldest_unacked(store: Store, queues: Sequence[str]) -> dict[str, float]:
    """Seconds since the oldest delivery still in flight of each queue was handed out."""
    if not queues:
        return {}
    rows = await store.fetch(OLDEST, list(queues))
    return {row["name"]: float(row["age"]) for row in rows}


async def _oldest_or_none(
    store: Store, queues: Sequence[str], problems: list[str]
) -> dict[str, float]:
    try:
        return await oldest_unacked(store, queues)
    except Exception as error:
        problems.append(f"oldest unacked ages unavailable: {describe(error)}")
        return {}


def queue_row(
    parts: Parts, info: admin.QueueInfo, counters: Mapping[str, Any], ages: Mapping[str, float]
) -> dict[str, Any]:
    """One queue of the overview: Admin's counts, /stats' counters, the sampler's rates."""
    rates = parts.history.rates(info.name)
    return {
        "name": info.name,
        **{name: getattr(info, name) for name in COUNTS},
        "oldest_unacked_seconds": ages.get(info.name),
        "counters": dict(counters),
        "rates": latest(rates),
        "spark": spark_paths(rates),
        "url": markup.link("/ui/queue", name=info.name),
    }


def latest(rates: Rates | None) -> dict[str, float | None]:
    return {name: rates.latest(name) if rates else None for name in SERIES}


SPARK_WIDTH, SPARK_HEIGHT = 120, 28


def spark_paths(rates: Rates | None) -> dict[str, str] | None:
    """The SVG paths of a sparkline, so the page's script redraws it without drawing code."""
    if rates is None:
        return None
    top = markup.highest(rates.series) or 1.0
    return {
        name: markup.path(values, top, SPARK_WIDTH, SPARK_HEIGHT)
        for name, values in rates.series.items()
    }


def totals(rows: Sequence[Mapping[str, Any]], rates: Rates | None, stats: Any) -> dict[str, Any]:
    """Sums over the queues shown (their counts are the whole bus's), this node's rates, and
    the calls it is serving now."""
    sums: dict[str, Any] = {name: sum(row[name] for row in rows) for name in COUNTS}
    sums["queues"] = len(rows)
    sums["rates"] = latest(rates)
    sums["spark"] = spark_paths(rates)
    sums["grpc_in_flight"] = stats["grpc"]["in_flight"]
    sums["background_backlog"] = sum(stats["background_backlog"].values())
    return sums


def nodes(
    stats: Mapping[str, Any], down: Mapping[str, str], degraded: Mapping[str, str], parts: list[str]
) -> list[dict[str, Any]]:
    """This node first with its dependencies (as /readyz finds them), then its live peers as
    PostgreSQL lists them (name, version, uptime)."""
    dependencies = {
        name: ("down: " + down[name])
        if name in down
        else ("degraded: " + degraded[name])
        if name in degraded
        else "up"
        for name in parts
    }
    this = {
        "name": stats["node"],
        "version": stats["version"],
        "uptime_seconds": stats["uptime_seconds"],
        "this": True,
        "dependencies": dependencies,
    }
    peers = stats["nodes"] if isinstance(stats["nodes"], list) else []
    now = time.time()
    return [this] + [
        {
            "name": peer["name"],
            "version": peer["version"],
            "uptime_seconds": now - datetime.fromisoformat(peer["started_at"]).timestamp(),
            "this": False,
            "dependencies": None,
        }
        for peer in peers
        if peer["name"] != stats["node"]
    ]


def bindings(publisher: Publisher) -> list[tuple[str, str]]:
    """(topic, queue) of every binding this node made on its current RabbitMQ connection, by
    topic: RabbitMQ's AMQP has no way to list an exchange's bindings."""
    declared = getattr(publisher, "_declared", None)  # the publisher's cache of declarations
    known = list(getattr(declared, "_known", ()))  # (no public way to list it yet)
    return sorted((entry[2], entry[1]) for entry in known if entry[0] == "binding")


def topics(publisher: Publisher) -> list[dict[str, Any]]:
    groups: dict[str, list[str]] = {}
    for topic, queue in bindings(publisher):
        groups.setdefault(topic, []).append(queue)
    return [
        {"name": t, "groups": g, "url": markup.link("/ui/topic", name=t)} for t, g in groups.items()
    ]


# ---- A queue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueView:
    info: admin.QueueInfo
    counters: dict[str, Any]
    rates: Rates | None
    oldest_unacked: float | None
    policy: Policy
    topics: list[str]
    dead_letters: list[Letter]
    delayed: list[Delayed]
    dead_offset: int
    delayed_offset: int


async def queue_view(parts: Parts, name: str, dead_offset: int, delayed_offset: int) -> QueueView:
    """A queue's page; NotFound when neither RabbitMQ nor PostgreSQL knows it."""
    info = await parts.queues.info(name)
    stats = await parts.stats()
    letters = await listings.dead_letters(parts.store, name, PAGE_SIZE + 1, dead_offset)
    delayed = await listings.delayed(parts.store, ("queue", name), PAGE_SIZE + 1, delayed_offset)
    ages = await oldest_unacked(parts.store, [name])
    return QueueView(
        info,
        stats["queues"].get(name, {}),
        parts.history.rates(name),
        ages.get(name),
        parts.policies.for_queue(name),
        [topic for topic, queue in bindings(parts.publisher) if queue == name],
        letters,
        delayed,
        dead_offset,
        delayed_offset,
    )


@dataclass(frozen=True)
class TopicView:
    name: str
    groups: list[admin.QueueInfo | str]  # a name alone: the queue is gone
    rates: Rates | None  # of publishing to the topic
    delayed: list[Delayed]
    delayed_offset: int


async def topic_view(parts: Parts, name: str, delayed_offset: int) -> TopicView:
    validate.name("topic", name, parts.namespace)
    groups: list[admin.QueueInfo | str] = []
    for topic, queue in bindings(parts.publisher):
        if topic == name:
            try:
                groups.append(await parts.queues.info(queue))
            except NotFound:
                groups.append(queue)
    delayed = await listings.delayed(parts.store, ("topic", name), PAGE_SIZE + 1, delayed_offset)
    return TopicView(name, groups, parts.history.rates(name), delayed, delayed_offset)
