"""Administration: queues, dead letters and delayed messages, as the `eventbus dead-letters` and
`eventbus delayed` commands and the eventbus.v2.Admin service both see them.

Every function here is on the trio side of the seam and checks what it is given: a bad queue
name (or one inside amqp.namespace), message id or page size is InvalidArgument, a queue the bus
does not know NotFound. A queue's counts come from three places: RabbitMQ (ready messages and
consumers, by a passive declare that never creates the queue), this node's prefetch buffers, and
PostgreSQL (deliveries in flight, delayed messages, dead letters).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ..backends import aio
from ..backends.broker import Broker
from ..backends.store import Store
from ..delivery import validate
from ..delivery.channels import Declarer, bounded
from ..delivery.consumer import Consumers
from ..delivery.publisher import Publisher, Target, finish_anyway
from ..errors import InvalidArgument, NotFound
from . import delay
from .deadletters import REQUEUE_BATCH, DeadLetter, Selection, list_letters, requeue

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # a page of a listing, and message ids in one call
MAX_QUEUES = 1000  # queues in one listing, first by name
PROBE_CHANNELS = 4

# Told how far a long operation is: (done, total). Called after each step, from the trio side.
Progress = Callable[[int, int], None]

# Per queue: deliveries handed out and not done (neither acked nor back in the queue; a nacked
# one counts until its retry), delayed messages bound for it, dead letters.
COUNTS = """
SELECT 'in_flight' AS part, d.queue AS name, count(*) AS n FROM deliveries d
WHERE NOT d.done AND d.queue = ANY($1::text[]) AND NOT EXISTS (
    SELECT 1 FROM settlements s WHERE s.delivery_id = d.id AND s.outcome <> 'nack')
GROUP BY d.queue
UNION ALL
SELECT 'delayed', target, count(*) FROM delayed_messages
WHERE kind = 'queue' AND target = ANY($1::text[]) GROUP BY target
UNION ALL
SELECT 'dead_letters', queue, count(*) FROM dead_letters WHERE queue = ANY($1::text[])
GROUP BY queue
"""
KNOWN = """
SELECT name FROM (
    SELECT queue AS name FROM deliveries WHERE NOT done
    UNION SELECT queue FROM dead_letters
    UNION SELECT target FROM delayed_messages WHERE kind = 'queue'
) AS known ORDER BY name LIMIT $1
"""


@dataclass(frozen=True)
class QueueInfo:
    name: str
    ready: int  # in RabbitMQ, plus those this node holds prefetched
    in_flight: int
    delayed: int
    dead_letters: int
    consumers: int  # AMQP consumers on the queue, of every node


def page_size(limit: int) -> int:
    """A listing's limit: 0 means DEFAULT_LIMIT, at most MAX_LIMIT."""
    if not 0 <= limit <= MAX_LIMIT:
        raise InvalidArgument(f"limit must be 0-{MAX_LIMIT} (0: {DEFAULT_LIMIT})")
    return limit or DEFAULT_LIMIT


def message_ids(values: Sequence[str]) -> list[str]:
    """Message ids as the bus hands them out (UUIDs in canonical form), each once, at most
    MAX_LIMIT; a bad one is named by its index."""
    if len(values) > MAX_LIMIT:
        raise InvalidArgument(f"message_ids: at most {MAX_LIMIT} in one call")
    ids: dict[str, None] = {}
    for index, value in enumerate(values):
        try:
            ids[validate.delivery_id(value)] = None
        except InvalidArgument:
            raise InvalidArgument(
                f"message_ids[{index}] {value[:64]!r} is not a message id"
            ) from None
    return list(ids)


def queue_filter(queue: str | None, namespace: str) -> str | None:
    """An optional queue to narrow a listing to: None or '' for every queue."""
    return validate.name("queue", queue, namespace) if queue else None


# ---- Dead letters --------------------------------------------------------------------------


async def list_dead_letters(
    store: Store,
    namespace: str,
    queue: str | None,
    limit: int,
    offset: int = 0,
    ids: Sequence[str] = (),
) -> list[DeadLetter]:
    """Dead letters, oldest first, from the offset-th on: of one queue or every queue, and of
    the given messages only (none given: all of them)."""
    selection = Selection(queue_filter(queue, namespace), tuple(message_ids(ids)))
    return await list_letters(store, selection, limit, offset)


async def delete_dead_letters(
    store: Store, namespace: str, queue: str | None, ids: Sequence[str]
) -> int:
    """Forget dead letters for good: of one queue (or, with ids, of any queue), of the given
    messages only (none given: all of that queue's). Returns how many went."""
    selection = Selection(queue_filter(queue, namespace), tuple(message_ids(ids)))
    if selection.queue is None and not selection.message_ids:
        raise InvalidArgument(
            "name a queue or message ids: every dead letter at once is not deleted"
        )
    where, args = selection.where()
    status = await store.execute(f"DELETE FROM dead_letters{where}", *args)
    return int(status.split()[-1])


async def requeue_dead_letters(
    store: Store,
    publisher: Publisher,
    namespace: str,
    queue: str | None,
    ids: Sequence[str],
    *,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Publish dead letters to their queue again as fresh messages: of one queue or every
    queue, of the given messages only (none given: all of them). Returns how many went back and
    how many RabbitMQ did not take (those stay). With progress: counted first, then told
    (done, total) after each page."""
    selection = Selection(queue_filter(queue, namespace), tuple(message_ids(ids)))
    if progress is None:
        return await requeue(store, publisher, selection)
    return await _requeue_in_steps(store, publisher, selection, progress)


async def count_dead_letters(store: Store, selection: Selection) -> int:
    where, args = selection.where()
    rows = await store.fetch(f"SELECT count(*) AS n FROM dead_letters{where}", *args)
    return int(rows[0]["n"])


async def _requeue_in_steps(
    store: Store, publisher: Publisher, selection: Selection, progress: Progress
) -> tuple[int, int]:
    """requeue() a page at a time (each page by queue, naming its letters), telling progress
    after each. A letter that stays is skipped by the next page's offset, as requeue does."""
    total = await count_dead_letters(store, selection)
    moved = kept = 0
    progress(0, total)
    while page := await list_letters(store, selection, REQUEUE_BATCH, offset=kept):
        by_queue: dict[str, list[str]] = {}
        for letter in page:
            by_queue.setdefault(letter.queue, []).append(letter.message_id)
        for queue, ids in by_queue.items():
            went, stayed = await requeue(store, publisher, Selection(queue, tuple(ids)))
            moved, kept = moved + went, kept + stayed
        total = max(total, moved + kept)  # some died while this ran
        progress(moved + kept, total)
    return moved, kept


# ---- Delayed messages ----------------------------------------------------------------------


def delayed_target(queue: str | None, topic: str | None, namespace: str) -> Target | None:
    """The queue or topic a listing of delayed messages is narrowed to (None: every target)."""
    if queue and topic:
        raise InvalidArgument("name a queue or a topic, not both")
    if topic:
        return "topic", validate.name("topic", topic, namespace)
    if queue:
        return "queue", validate.name("queue", queue, namespace)
    return None


async def list_delayed(
    store: Store,
    target: Target | None,
    limit: int,
    offset: int = 0,
    *,
    quarantined: bool = False,
) -> list[delay.Pending]:
    """Delayed messages not yet moved, soonest first, from the offset-th on: of one queue or
    topic or all, optionally only the quarantined ones."""
    kind, name = target if target is not None else (None, None)
    return await delay.pending(store, kind, name, limit, quarantined=quarantined, offset=offset)


async def cancel_delayed(store: Store, ids: Sequence[str]) -> tuple[int, list[str]]:
    """Forget delayed messages not moved yet (quarantined or not). Returns how many were
    cancelled and the ids that named none, in the order given."""
    wanted = message_ids(ids)
    if not wanted:
        raise InvalidArgument("message_ids must not be empty")
    cancelled = await delay.cancel_all(store, wanted)
    return len(cancelled), [i for i in wanted if i not in cancelled]


async def cancel_delayed_many(
    store: Store, ids: Sequence[str], progress: Progress | None = None
) -> tuple[int, list[str]]:
    """cancel_delayed for any number of ids, MAX_LIMIT a call, telling progress (done, total)
    after each."""
    wanted = list(dict.fromkeys(ids))
    cancelled, not_found = 0, list[str]()
    for start in range(0, len(wanted), MAX_LIMIT):
        done, missing = await cancel_delayed(store, wanted[start : start + MAX_LIMIT])
        cancelled, not_found = cancelled + done, not_found + missing
        if progress is not None:
            progress(min(start + MAX_LIMIT, len(wanted)), len(wanted))
    return cancelled, not_found


async def count_delayed(store: Store, target: Target | None) -> int:
    if target is None:
        rows = await store.fetch("SELECT count(*) AS n FROM delayed_messages")
    else:
        rows = await store.fetch(
            "SELECT count(*) AS n FROM delayed_messages WHERE kind = $1 AND target = $2", *target
        )
    return int(rows[0]["n"])


async def cancel_every_delayed(
    store: Store, target: Target | None, progress: Progress | None = None
) -> int:
    """Cancel every delayed message not moved yet (of one queue or topic, or of all), a page at
    a time, telling progress after each; those added meanwhile past the count taken first stay.
    Returns how many were cancelled."""
    total = await count_delayed(store, target)
    cancelled = seen = 0
    if progress is not None:
        progress(0, total)
    while seen < total and (page := await list_delayed(store, target, MAX_LIMIT)):
        page = page[: total - seen]
        done, _ = await cancel_delayed(store, [row.id for row in page])
        cancelled, seen = cancelled + done, seen + len(page)
        if progress is not None:
            progress(seen, total)
    return cancelled


# ---- Queues --------------------------------------------------------------------------------


class Queues:
    """Queue counts and purges. RabbitMQ is asked over declaring channels of its own, on the
    connection that never publishes (so this goes on while RabbitMQ blocks publishers); a
    channel whose call failed is closed, not reused."""

    def __init__(
        self,
        store: Store,
        broker: Broker,
        consumers: Consumers,
        namespace: str,
        seen: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self._store = store
        self._consumers = consumers
        self._namespace = namespace
        self._seen = seen  # queues this node has published to or handed out from
        self._declarer = Declarer(broker, PROBE_CHANNELS)

    async def info(self, queue: str) -> QueueInfo:
        """A queue's counts; NotFound when neither RabbitMQ nor PostgreSQL knows it."""
        validate.name("queue", queue, self._namespace)
        [info] = await self._infos([queue])
        if info is None:
            raise NotFound(f"queue {queue!r} does not exist")
        return info

    async def known(self) -> list[QueueInfo]:
        """The counts of every queue the bus knows, by name, at most MAX_QUEUES: those with
        deliveries in flight, delayed messages or dead letters, those this node consumes, and
        those it has published to or handed out from (as /stats lists them)."""
        rows = await self._store.fetch(KNOWN, MAX_QUEUES)
        names = {row["name"] for row in rows}
        names.update(c.queue for c in self._consumers.running())
        names.update(self._seen())
        names = {name for name in names if not self._internal(name)}
        infos = await self._infos(sorted(names)[:MAX_QUEUES])
        return [info for info in infos if info is not None]

    async def purge(self, queue: str) -> int:
        """Remove the ready messages of a queue from RabbitMQ; returns how many. Those handed
        out, prefetched by a node, delayed or dead are not touched."""
        validate.name("queue", queue, self._namespace)
        try:
            return await aio.call(finish_anyway, self._purge(queue))
        except NotFound:
            raise NotFound(f"queue {queue!r} does not exist") from None

    def _internal(self, queue: str) -> bool:
        return queue == self._namespace or queue.startswith(self._namespace + ".")

    async def _infos(self, queues: list[str]) -> list[QueueInfo | None]:
        """Counts of each queue, in order; None for one that neither RabbitMQ nor PostgreSQL
        knows."""
        in_rabbitmq = await aio.call(self._look_all, queues)
        counts = await self._counts(queues)
        buffered = self._consumers.buffered()
        return [
            _info(q, found, counts.get(q, {}), buffered.get(q, 0))
            for q, found in zip(queues, in_rabbitmq, strict=True)
        ]

    async def _counts(self, queues: list[str]) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for row in await self._store.fetch(COUNTS, queues):
            counts.setdefault(row["name"], {})[row["part"]] = int(row["n"])
        return counts

    async def _look_all(self, queues: list[str]) -> list[tuple[int, int] | None]:
        """(asyncio side) (ready, consumers) of each queue, None where RabbitMQ has no such
        queue; at most PROBE_CHANNELS at a time, each to its end, then the first failure."""
        looks = [finish_anyway(self._look(q)) for q in queues]
        results = await asyncio.gather(*looks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, NotFound):
                raise result
        return [None if isinstance(r, BaseException) else r for r in results]

    async def _look(self, queue: str) -> tuple[int, int]:
        """(asyncio side) A passive declare: NotFound when RabbitMQ has no such queue."""
        async with self._declarer.channel() as channel:
            declared = await bounded(
                f"looking up queue {queue!r}", channel.declare_queue(queue, passive=True)
            )
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def _purge(self, queue: str) -> int:
        async with self._declarer.channel() as channel:
            declared = await bounded(
                f"looking up queue {queue!r}", channel.declare_queue(queue, passive=True)
            )
            purged = await bounded(f"purging queue {queue!r}", declared.purge())
        return int(purged.message_count or 0)


def _info(
    queue: str, in_rabbitmq: tuple[int, int] | None, counts: dict[str, int], buffered: int
) -> QueueInfo | None:
    if in_rabbitmq is None and not any(counts.values()):
        return None
    ready, consumers = in_rabbitmq or (0, 0)
    return QueueInfo(
        queue,
        ready + buffered,
        counts.get("in_flight", 0),
        counts.get("delayed", 0),
        counts.get("dead_letters", 0),
        consumers,
    )
