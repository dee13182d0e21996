"""`eventbus delayed release`: quarantined delayed messages put back, one or all, after an
operator fixed what was wrong."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from tests.daemon_process import to_toml


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "eventbus", *args, "--config", str(config)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


async def sql(dsn: str, statement: str, *args: Any) -> list[Any]:
    connection = await asyncpg.connect(dsn)
    try:
        return list(await connection.fetch(statement, *args))
    finally:
        await connection.close()


def quarantined(dsn: str, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for message_id in ids:
        asyncio.run(
            sql(
                dsn,
                "INSERT INTO delayed_messages (id, kind, target, body, due_at, quarantined_at, "
                "quarantine_reason, publish_failures) "
                "VALUES ($1, 'queue', 'q', 'x', now(), now(), 'refused', 3)",
                uuid.UUID(message_id),
            )
        )
    return ids


def still_quarantined(dsn: str) -> set[str]:
    rows = asyncio.run(
        sql(dsn, "SELECT id::text FROM delayed_messages WHERE quarantined_at IS NOT NULL")
    )
    return {r["id"] for r in rows}


def test_release_one_or_all_quarantined_delayed_messages(postgres_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(to_toml({"postgres": {"dsn": postgres_dsn}}))
    assert cli(config, "migrate").returncode == 0
    first, *others = quarantined(postgres_dsn, 3)
    released = cli(config, "delayed", "release", first)
    assert released.returncode == 0, released.stderr
    assert still_quarantined(postgres_dsn) == set(others)
    [row] = asyncio.run(
        sql(
            postgres_dsn,
            "SELECT quarantine_reason, publish_failures, claimed_until "
            "FROM delayed_messages WHERE id = $1",
            uuid.UUID(first),
        )
    )
    assert tuple(row) == (None, 0, None)  # claimed at the next tick
    assert cli(config, "delayed", "release", first).returncode == 1  # not quarantined now
    assert cli(config, "delayed", "release").returncode == 2  # neither an ID nor --all
    assert cli(config, "delayed", "release", "--all").returncode == 0
    assert still_quarantined(postgres_dsn) == set()
    assert len(asyncio.run(sql(postgres_dsn, "SELECT id FROM delayed_messages"))) == 3
