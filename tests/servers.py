"""Test-run isolation on the shared servers: a RabbitMQ vhost, PostgreSQL databases and a Redis
key prefix of this run's own, all removed afterwards."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg
import redis

from eventbus.config import PostgresConfig

if TYPE_CHECKING:
    from eventbus.backends.store import Store

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_HOST = "127.0.0.1:5672"
REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_port() -> int:
    """A port where nothing listens (bound once, then released)."""
    return free_port()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def connections(vhost: str, *columns: str) -> list[list[str]]:
    """The given columns of every connection to vhost, as rabbitmqctl list_connections says
    (which lists every virtual host's, whatever -p asks)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "vhost", *columns],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
    return [row[1:] for row in rows if row[0] == vhost]


def create_vhost(name: str) -> str:
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    return f"amqp://guest:guest@{AMQP_HOST}/{name}"


def start_rabbitmq_if_down(patience: float = 180) -> None:
    """Start the local RabbitMQ node when it does not answer, and wait until it has booted."""
    ping = ["rabbitmqctl", "-q", "ping"]
    if subprocess.run(ping, capture_output=True, timeout=60).returncode != 0:
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
    deadline = time.monotonic() + patience
    while subprocess.run(ping, capture_output=True, timeout=60).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("RabbitMQ did not come back")
        time.sleep(1)
    rabbitmqctl("await_startup", "--timeout", str(int(patience)))


def delete_vhost(name: str) -> None:
    rabbitmqctl("delete_vhost", name)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def create_database(name: str) -> str:
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def delete_redis_keys(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


async def with_store(postgres_dsn: str, work: Callable[[Store], Awaitable[None]]) -> None:
    """Run work on a Store of the database at postgres_dsn (migrated), closed after."""
    # Imported here: trio-asyncio, once imported, makes asyncio.run() use its loop, which
    # would slow down the benchmarks' plain aio-pika baselines that import this module.
    from eventbus.backends import aio
    from eventbus.backends.store import open_store

    async with aio.open_loop(lambda: None):
        store = await open_store(PostgresConfig(dsn=postgres_dsn), window=10)
        try:
            await work(store)
        finally:
            await store.close()
