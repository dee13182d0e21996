"""Cluster membership: each daemon records itself in PostgreSQL so /stats can list live peers."""

from __future__ import annotations

import logging
from typing import Any

import trio

from .. import __version__
from ..backends.retry import describe
from ..backends.store import Store

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 10.0
ALIVE_SECONDS = 3 * REFRESH_SECONDS

UPSERT = """
INSERT INTO nodes (name, version, started_at, seen_at) VALUES ($1, $2, now(), now())
ON CONFLICT (name) DO UPDATE
SET version = EXCLUDED.version,
    started_at = CASE WHEN $3 THEN now() ELSE nodes.started_at END,
    seen_at = now()
"""

ALIVE = """
SELECT name, version, started_at, seen_at FROM nodes
WHERE seen_at > now() - make_interval(secs => $1) ORDER BY name
"""


async def keep_registered(store: Store, node: str) -> None:
    """Refresh this node's row every REFRESH_SECONDS, forever; an outage only skips turns."""
    first = True
    while True:
        try:
            await store.execute(UPSERT, node, __version__, first)
            first = False
        except Exception as error:
            logger.debug("nodes: could not refresh %s: %s", node, describe(error))
        await trio.sleep(REFRESH_SECONDS)


async def alive(store: Store) -> list[dict[str, Any]]:
    """The nodes seen within ALIVE_SECONDS."""
    rows = await store.fetch(ALIVE, ALIVE_SECONDS)
    return [
        {
            "name": r["name"],
            "version": r["version"],
            "started_at": r["started_at"].isoformat(),
            "seen_at": r["seen_at"].isoformat(),
        }
        for r in rows
    ]
