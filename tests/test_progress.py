"""Progress bars of the long commands against a real daemon's backends: `dead-letters requeue
--all`, `delayed cancel` of many, `purge` and `migrate` draw one on a real terminal (tmux), and
none when their output is piped or with --quiet; the work itself is done either way."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventbus.backends import migrations
from eventbus.client import Client, OutboundMessage
from tests import servers
from tests.daemon_process import DaemonProcess, to_toml
from tests.terminal import eventbus, module_daemon, tmux, wait_until, with_client

BAR = "━"  # what rich draws a bar with


@pytest.fixture(scope="module")
def bus(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("progress") / "node0"
    with module_daemon(amqp_url, directory, cron={"interval_seconds": 0.2}) as daemon:
        yield daemon


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def configured(daemon: DaemonProcess, *args: str) -> list[str]:
    return [*args, "--config", str(daemon.config_path)]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def dead_letters(daemon: DaemonProcess, queue: str, count: int) -> None:
    """`count` dead letters in the queue: published, pulled and dead-lettered with the client;
    returns once PostgreSQL holds them all."""

    async def scenario(client: Client) -> None:
        await client.publish_batch(OutboundMessage(b"d%d" % i, queue=queue) for i in range(count))
        taken = []
        while len(taken) < count:
            taken += await client.pull(queue, count - len(taken), wait_seconds=5)
        assert await client.nack([m.ack_id for m in taken], dead_letter=True) == []

    with_client(daemon.grpc_address, scenario)
    wait_until(lambda: listed_dead(daemon, queue) == count, what=f"{count} dead letters")


def listed_dead(daemon: DaemonProcess, queue: str) -> int:
    args = configured(daemon, "dead-letters", "list", "--queue", queue, "--limit", "1000")
    result = eventbus(*args, "--json")
    assert result.returncode == 0, result.stderr
    return len(result.stdout.splitlines())


def delayed_count(daemon: DaemonProcess, queue: str) -> int:
    result = eventbus("queues", queue, "--json", "--server", daemon.grpc_address)
    return int(json.loads(result.stdout)["delayed"]) if result.returncode == 0 else -1


def delay(daemon: DaemonProcess, queue: str, count: int) -> None:
    """`count` messages due in an hour; returns once PostgreSQL holds them all."""

    async def scenario(client: Client) -> None:
        for start in range(0, count, 500):
            batch = range(start, min(start + 500, count))
            await client.publish_batch(
                OutboundMessage(b"l%d" % i, queue=queue, delay_seconds=3600) for i in batch
            )

    with_client(daemon.grpc_address, scenario)
    wait_until(lambda: delayed_count(daemon, queue) == count, what=f"{count} delayed")


def test_requeue_all_draws_a_bar_on_a_terminal_only(bus: DaemonProcess) -> None:
    first, second = unique("fragile"), unique("fragile")
    dead_letters(bus, first, 40)
    dead_letters(bus, second, 20)
    with tmux(120, 30) as terminal:
        terminal.run(configured(bus, "dead-letters", "requeue", "--all"))
        assert terminal.exit_status(60) == 0
        screen = terminal.screen()
    assert "requeueing dead letters" in screen and BAR in screen
    assert "60/60" in screen and "requeued 60 dead letters" in screen
    assert listed_dead(bus, first) == listed_dead(bus, second) == 0

    dead_letters(bus, first, 5)
    piped = eventbus(*configured(bus, "dead-letters", "requeue", "--all"))
    assert piped.returncode == 0, piped.stderr
    assert "requeued 5 dead letters" in piped.stderr
    assert BAR not in piped.stderr and "requeueing" not in piped.stderr
    assert listed_dead(bus, first) == 0

    dead_letters(bus, second, 3)
    with tmux(120, 30) as terminal:
        terminal.run(configured(bus, "dead-letters", "requeue", "--queue", second, "--quiet"))
        assert terminal.exit_status(60) == 0
        screen = terminal.screen()
    assert "requeued 3 dead letters" in screen and BAR not in screen
    assert listed_dead(bus, second) == 0


def test_cancel_every_delayed_message_of_a_queue_with_a_bar(bus: DaemonProcess) -> None:
    queue, kept = unique("later"), unique("later")
    delay(bus, queue, 1500)  # two pages of 1000
    delay(bus, kept, 2)
    with tmux(120, 30) as terminal:
        terminal.run(configured(bus, "delayed", "cancel", "--all", "--queue", queue))
        assert terminal.exit_status(60) == 0
        screen = terminal.screen()
    assert "cancelling delayed messages" in screen and "1500/1500" in screen and BAR in screen
    assert "cancelled 1500 delayed message(s)" in screen
    assert delayed_count(bus, queue) == 0 and delayed_count(bus, kept) == 2


def test_cancel_ids_from_stdin_quietly_when_piped(bus: DaemonProcess) -> None:
    queue = unique("later")
    delay(bus, queue, 3)
    listing = eventbus(*configured(bus, "delayed", "list", "--queue", queue, "--json"))
    ids = [row["id"] for row in json_lines(listing.stdout)]
    absent = str(uuid.uuid4())
    result = eventbus(*configured(bus, "delayed", "cancel", "-"), stdin="\n".join([*ids, absent]))
    assert result.returncode == 1  # one id named nothing
    assert f"no pending delayed message {absent}" in result.stderr
    assert "cancelled 3 delayed message(s)" in result.stderr
    assert "1 of 4 ids named no pending message" in result.stderr
    assert BAR not in result.stderr and "cancelling" not in result.stderr
    assert delayed_count(bus, queue) == 0
    bad = eventbus(*configured(bus, "delayed", "cancel", "-"), stdin="not-an-id\n")
    assert bad.returncode == 2 and "is not a message id" in bad.stderr


def test_purge_draws_a_bar_over_the_queues(bus: DaemonProcess) -> None:
    queues = [unique("full"), unique("full")]

    async def fill(client: Client) -> None:
        for queue in queues:
            await client.publish_batch(OutboundMessage(b"x", queue=queue) for _ in range(3))

    with_client(bus.grpc_address, fill)
    with tmux(120, 30) as terminal:
        terminal.run(["purge", *queues, "--server", bus.grpc_address])
        assert terminal.exit_status(60) == 0
        screen = terminal.screen()
    assert "purged" in screen and "2/2" in screen and BAR in screen
    for queue in queues:  # the terminal shows each line's tab as spaces
        assert re.search(rf"{re.escape(queue)}\s+3 purged", screen), screen


def test_migrate_draws_a_bar_of_the_migrations(tmp_path: Path) -> None:
    database = servers.unique_name("eventbus_test")
    dsn = servers.create_database(database)
    try:
        config = tmp_path / "config.toml"
        config.write_text(to_toml({"postgres": {"dsn": dsn}}))
        total = len(migrations.available())
        with tmux(120, 30) as terminal:
            terminal.run(["migrate", "--config", str(config)])
            assert terminal.exit_status(120) == 0
            screen = terminal.screen()
        assert "schema up to date" in screen and f"{total}/{total}" in screen and BAR in screen
        again = eventbus("migrate", "--config", str(config))
        assert again.returncode == 0 and "schema is up to date" in again.stderr
        assert BAR not in again.stderr and "schema up to date" not in again.stderr
    finally:
        servers.drop_database(database)
