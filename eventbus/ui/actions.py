"""What the admin page changes: requeue or delete dead letters, cancel delayed messages, purge
a queue. Each goes through eventbus.jobs.admin, as `eventbus dead-letters` / `eventbus delayed`
and the v2 Admin service do, and is counted and logged as theirs are (eventbus_admin_actions,
the eventbus.audit log: who, from where, what, on what)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import InvalidArgument
from ..jobs import admin
from ..ops.metrics import Metrics
from ..security.access import Identity
from .views import Parts

# Every action and login, each its own line: only an admin (or, with auth off, whoever reaches
# the port) takes them, one request each, so nobody else can flood the log through them.
# Refusals stay rate limited (api.http.refused).
audit = logging.getLogger("eventbus.audit")


def record(metrics: Metrics, method: str, identity: Identity, peer: str, target: str) -> None:
    """An admin action from the page: counted, and logged with who, from where and on what."""
    metrics.admin_actions.labels(method, identity.name or "-").inc()
    audit.info(
        "admin: %s from %s: %s on %s",
        f"identity {identity.name}" if identity.name else "a caller (auth off)",
        peer,
        method,
        target,
    )


async def requeue(parts: Parts, queue: str, ids: Sequence[str]) -> tuple[int, int]:
    """Dead letters of queue back to it (none named: all of them): (moved, kept)."""
    return await admin.requeue_dead_letters(
        parts.store, parts.publisher, parts.namespace, _queue(queue), ids
    )


async def delete(parts: Parts, queue: str, ids: Sequence[str]) -> int:
    """Forget dead letters of queue (none named: all of them); returns how many."""
    return await admin.delete_dead_letters(parts.store, parts.namespace, _queue(queue), ids)


async def cancel(parts: Parts, ids: Sequence[str]) -> tuple[int, list[str]]:
    """Cancel delayed messages not moved yet: (cancelled, ids that named none)."""
    return await admin.cancel_delayed(parts.store, ids)


async def purge(parts: Parts, queue: str) -> int:
    """The ready messages of a queue, removed from RabbitMQ; returns how many."""
    return await parts.queues.purge(_queue(queue))


def _queue(queue: str) -> str:
    if not queue:
        raise InvalidArgument("queue must not be empty")
    return queue
