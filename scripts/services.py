"""Make sure RabbitMQ, PostgreSQL and Redis answer where the configuration points, for `make run`
and `make test` on a development machine (root on Debian).

A service that answers is left alone. One that does not, on a local address, is installed with
apt-get where missing and started; then the configured database is created if it does not exist.
Usage: python scripts/services.py [CONFIG]   (environment overrides apply, as for the daemon)
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from eventbus.config import load

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
WAIT_SECONDS = 90


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    default_port: int
    package: str
    binary: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or self.default_port


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def run(command: str) -> None:
    print(f"+ {command}", flush=True)
    subprocess.run(command, shell=True, check=True)


def install(service: Service) -> None:
    if shutil.which(service.binary) or os.path.exists(service.binary):
        return
    run("apt-get update -q")
    run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -q {service.package}")


def start_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    if not glob.glob(f"/etc/postgresql/{version}/main/pg_hba.conf"):
        run(f"pg_createcluster {version} main")
    trust_loopback(f"/etc/postgresql/{version}/main/pg_hba.conf")
    run(f"pg_ctlcluster --skip-systemctl-redirect {version} main start")


def trust_loopback(hba_path: str) -> None:
    """Let the local development cluster accept postgres over loopback without a password."""
    with open(hba_path) as file:
        text = file.read()
    marker = "# eventbus development: trust loopback"
    if marker not in text:
        lines = f"{marker}\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
        with open(hba_path, "w") as file:
            file.write(lines + text)


def start_rabbitmq() -> None:
    """Start a detached node and wait until it has booted.

    `rabbitmqctl await_startup` fails at once while the new node has not yet registered with
    epmd, so first wait for `rabbitmqctl ping` to reach it.
    """
    run("rabbitmq-server -detached")
    deadline = time.monotonic() + WAIT_SECONDS
    ping = ["rabbitmqctl", "-q", "ping"]
    while subprocess.run(ping, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            run("tail -n 40 /var/log/rabbitmq/*.log || true")
            sys.exit("rabbitmq: the node did not start")
        time.sleep(1)
    run(f"rabbitmqctl -q await_startup --timeout {WAIT_SECONDS}")


STARTERS = {
    "postgresql": start_postgres,
    "redis": lambda: run(
        "mkdir -p /var/lib/redis /var/log/redis && redis-server --daemonize yes --bind 127.0.0.1 "
        '-::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis '
        "--logfile /var/log/redis/ci.log"
    ),
    "rabbitmq": start_rabbitmq,
}


def ensure(service: Service) -> None:
    host, port = service.address
    if answers(host, port):
        print(f"{service.name}: answers at {host}:{port}")
        return
    if host not in LOCAL_HOSTS:
        sys.exit(f"{service.name}: nothing answers at {host}:{port}, and it is not local")
    print(f"{service.name}: nothing answers at {host}:{port}; starting a local one")
    install(service)
    STARTERS[service.name]()
    deadline = time.monotonic() + WAIT_SECONDS
    while not answers(host, port):
        if time.monotonic() > deadline:
            sys.exit(f"{service.name}: still not answering at {host}:{port}")
        time.sleep(0.5)


async def ensure_database(dsn: str) -> None:
    """Create the configured database when it does not exist."""
    name = urlsplit(dsn).path.lstrip("/")
    admin = urlsplit(dsn)._replace(path="/postgres").geturl()
    connection = await asyncpg.connect(admin)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await connection.execute(f'CREATE DATABASE "{name}"')
            print(f"postgresql: created database {name}")
    finally:
        await connection.close()


def main() -> None:
    config = load(sys.argv[1] if len(sys.argv) > 1 else "config.toml")
    for service in [
        Service("rabbitmq", config.amqp.url, 5672, "rabbitmq-server", "rabbitmq-server"),
        Service("postgresql", config.postgres.dsn, 5432, "postgresql", "/usr/lib/postgresql"),
        Service("redis", config.redis.url, 6379, "redis-server", "redis-server"),
    ]:
        ensure(service)
    asyncio.run(ensure_database(config.postgres.dsn))


if __name__ == "__main__":
    main()
