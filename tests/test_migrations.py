from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from eventbus.backends import aio, migrations
from eventbus.backends.store import open_store
from eventbus.config import PostgresConfig
from tests.daemon_process import to_toml


async def test_two_daemons_migrating_at_once_apply_each_version_once(postgres_dsn: str) -> None:
    applied: list[list[str]] = []

    async def start_one() -> None:
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        applied.append(await migrations.apply(store))  # a second apply finds nothing to do
        await store.close()

    async with aio.open_loop(lambda: None), trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(start_one)

        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        rows = await store.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        tables = await store.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        await store.close()
    assert applied == [[], [], []]
    shipped = migrations.available()
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in shipped]
    assert {"nodes", "schema_migrations"} <= {t["tablename"] for t in tables}


def test_shipped_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in migrations.available()]
    assert versions == list(range(1, len(versions) + 1))


def test_migrate_command(postgres_dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(to_toml({"postgres": {"dsn": postgres_dsn}}))
    command = [sys.executable, "-m", "eventbus", "migrate", "--config", str(config)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and second.returncode == 0
    assert "applied migrations 0001_nodes" in first.stderr
    assert "applied migrations" not in second.stderr
    assert "schema is up to date" in second.stderr


async def test_each_migration_is_named_in_the_log_before_it_runs(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventbus.backends.migrations")
    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        await store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "eventbus.backends.migrations"]
    shipped = migrations.available()
    assert len(lines) == len(shipped)
    assert all(
        f"applying migration {m.version:04d}_{m.name}" in line
        for m, line in zip(shipped, lines, strict=True)
    )
    assert migrations.TIMEOUT >= 3600  # 0004 rewrites tables at about 8 s per million rows
