"""Versioned SQL migrations: NNNN_name.sql files applied in order, each once, under a lock.

Two daemons starting at once both call apply(); the transaction-scoped advisory lock lets one
apply what is missing while the other waits and then finds nothing left to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from ..store import Store

# pg_advisory_xact_lock key: the bytes of "eventbus" read as a big-endian integer, minus the sign.
LOCK_KEY = int.from_bytes(b"eventbus", "big") & 0x7FFF_FFFF_FFFF_FFFF
logger = logging.getLogger(__name__)

# A migration that rewrites a table takes about 8 s per million rows (0004 on deliveries); the
# limit only guards against one that waits forever (on a lock held by a node of the old version).
TIMEOUT = 6 * 3600.0

CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files(__package__).iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def apply(store: Store) -> list[str]:
    """Apply every migration not yet recorded; returns the names of those applied now."""
    pending = available()

    async def work(connection: Any) -> list[str]:
        await connection.execute("SELECT pg_advisory_xact_lock($1)", LOCK_KEY)
        await connection.execute(CREATE_TABLE)
        done = {row[0] for row in await connection.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in pending:
            if migration.version not in done:
                logger.info(
                    "PostgreSQL: applying migration %04d_%s (a migration that rewrites a large "
                    "table can take minutes)",
                    migration.version,
                    migration.name,
                )
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
                applied.append(f"{migration.version:04d}_{migration.name}")
        return applied

    with trio.fail_after(TIMEOUT):
        return await store.transaction(work)
