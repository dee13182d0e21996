"""`eventbus publish`, `pull`, `queues` and `purge` against real daemons, as a user runs them
(a subprocess, output piped), beside traffic from the Python client: what they print, what the
bus holds afterwards, tokens, TLS and mTLS, and the one-line errors with their exit statuses
(0 done, 1 refused by the bus, 2 usage, 3 unreachable)."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventbus import cli
from eventbus.client import Client, OutboundMessage, ReceivedMessage
from eventbus.tools import output, remote
from tests import servers
from tests.certs import Issued, issue, make_ca
from tests.daemon_process import DaemonProcess, auth_table
from tests.terminal import EVENTBUS, ROOT, eventbus, module_daemon, wait_until, with_client

QUICK: dict[str, dict[str, Any]] = {
    "delivery": {"nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
    "queues": {"short.*": {"ack_deadline_seconds": 6}, "brief.*": {"ack_deadline_seconds": 1}},
}


@pytest.fixture(scope="module")
def bus(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with module_daemon(amqp_url, tmp_path_factory.mktemp("cli") / "node0", **QUICK) as daemon:
        yield daemon


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def at(daemon: DaemonProcess, *args: str, **options: Any) -> Any:
    """`eventbus ARGS --server` the daemon's gRPC address."""
    return eventbus(*args, "--server", daemon.grpc_address, **options)


def ok(result: Any) -> Any:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def publish(daemon: DaemonProcess, queue: str, *bodies: bytes, **fields: Any) -> list[str]:
    """Publish with the Python client; the message ids."""

    async def send(client: Client) -> list[str]:
        results = await client.publish_batch(
            OutboundMessage(body, queue=queue, **fields) for body in bodies
        )
        return [result.message_id for result in results]

    return with_client(daemon.grpc_address, send)


def pull_with_client(daemon: DaemonProcess, queue: str, count: int) -> list[ReceivedMessage]:
    """Pull `count` messages with the Python client, leaving them unsettled."""

    async def take(client: Client) -> list[ReceivedMessage]:
        got: list[ReceivedMessage] = []
        while len(got) < count:
            got += await client.pull(queue, count - len(got), wait_seconds=5)
        return got

    return with_client(daemon.grpc_address, take)


def one_error_line(result: Any, status: int, text: str) -> None:
    """The command failed with this status and one line on stderr holding text."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eventbus") and text in lines[0], lines


# ---- publish and pull ------------------------------------------------------------------------


def test_publish_from_data_file_and_stdin_then_pull_and_ack(
    bus: DaemonProcess, tmp_path: Path
) -> None:
    queue = unique("cli")
    body = tmp_path / "body.bin"
    body.write_bytes(b"\xff\x00 not utf-8")
    published = [
        ok(at(bus, "publish", queue, "--data", "from data", "--attr", "k=v", "--attr", "n=2")),
        ok(at(bus, "publish", queue, "--file", str(body))),
        ok(at(bus, "publish", queue, "-", stdin="from stdin")),
    ]
    ids = [result.stdout.strip() for result in published]
    assert all(str(uuid.UUID(message_id)) == message_id for message_id in ids)

    pulled = ok(at(bus, "pull", queue, "--max", "3", "--wait", "10", "--ack", "--json"))
    rows = {row["message_id"]: row for row in json_lines(pulled.stdout)}
    assert set(rows) == set(ids)
    assert rows[ids[0]]["data"] == "from data"
    assert rows[ids[0]]["attributes"] == {"k": "v", "n": "2"}
    assert rows[ids[1]]["data_base64"] == base64.b64encode(b"\xff\x00 not utf-8").decode()
    assert rows[ids[2]]["data"] == "from stdin"
    assert {row["attempt"] for row in rows.values()} == {1}
    assert {row["queue"] for row in rows.values()} == {queue}
    assert "acked 3 message(s)" in pulled.stderr

    nothing = ok(at(bus, "pull", queue, "--wait", "1"))
    assert nothing.stdout == "" and "no message" in nothing.stderr


def test_pull_without_ack_leaves_the_message_to_come_back(bus: DaemonProcess) -> None:
    queue = unique("short")  # ack deadline 6 s
    [message_id] = publish(bus, queue, b"come back")
    first = ok(at(bus, "pull", queue, "--wait", "10", "--json"))
    [row] = json_lines(first.stdout)
    assert row["message_id"] == message_id and row["attempt"] == 1 and row["data"] == "come back"
    assert "left handed out" in first.stderr and "ack deadline" in first.stderr

    assert ok(at(bus, "pull", queue, "--wait", "0.5")).stdout == ""  # still handed out
    again = ok(at(bus, "pull", queue, "--wait", "30", "--json", "--ack"))
    [back] = json_lines(again.stdout)
    assert back["message_id"] == message_id and back["attempt"] == 2
    assert back["ack_id"] != row["ack_id"]


def test_pull_nack_gives_the_message_back_and_text_output(bus: DaemonProcess) -> None:
    queue = unique("nacked")
    [message_id] = publish(bus, queue, b"twice", attributes={"b": "2", "a": "1"})
    first = ok(at(bus, "pull", queue, "--wait", "10", "--nack"))
    fields = first.stdout.rstrip("\n").split("\t")
    assert fields[0] == message_id and fields[1] == "1"
    assert fields[3] == "a=1,b=2" and fields[4] == "twice"
    assert "nacked 1 message(s)" in first.stderr
    again = ok(at(bus, "pull", queue, "--wait", "30", "--json", "--ack"))
    [back] = json_lines(again.stdout)
    assert back["message_id"] == message_id and back["attempt"] == 2


def publish_many(daemon: DaemonProcess, queue: str, count: int, body: bytes = b"m") -> None:
    """Publish count copies of body with the Python client, a hundred a call."""

    async def send(client: Client) -> None:
        for start in range(0, count, 100):
            batch = min(100, count - start)
            await client.publish_batch(OutboundMessage(body, queue=queue) for _ in range(batch))

    with_client(daemon.grpc_address, send)


def counted(stderr: str, what: str) -> int:
    """N in the stderr line `eventbus: N WHAT` (`eventbus: acked N message(s)` for acked)."""
    if what == "acked":
        found = re.search(r"eventbus: acked (\d+) message", stderr)
    else:
        found = re.search(rf"eventbus: (\d+) {what}", stderr)
    assert found, (what, stderr)
    return int(found[1])


def piped_pull(daemon: DaemonProcess, *args: str) -> subprocess.Popen[bytes]:
    """`eventbus pull ARGS` with its standard output a pipe this test reads when it likes."""
    command = [*EVENTBUS, "pull", *args, "--server", daemon.grpc_address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def test_pull_acks_more_than_one_acknowledge_takes_batch_by_batch(bus: DaemonProcess) -> None:
    queue = unique("many")
    publish_many(bus, queue, 10_050)  # over the daemon's 10,000 ack ids in one Acknowledge
    pulled = ok(at(bus, "pull", queue, "--max", "20000", "--wait", "10", "--ack", timeout=300))
    lines = pulled.stdout.splitlines()
    assert len(lines) == counted(pulled.stderr, "acked") == 10_050
    assert len({line.split("\t")[0] for line in lines}) == 10_050
    assert "not acked" not in pulled.stderr and "left handed out" not in pulled.stderr
    assert ok(at(bus, "pull", queue, "--wait", "1")).stdout == ""


def test_acks_after_the_deadline_are_status_1_and_the_messages_come_back(
    bus: DaemonProcess,
) -> None:
    queue = unique("brief")  # ack deadline 1 s
    publish_many(bus, queue, 3, b"x" * 100_000)  # more than a pipe holds: printing blocks
    blocked = piped_pull(bus, queue, "--max", "3", "--wait", "10", "--ack")
    time.sleep(4)  # the pull printing into a full pipe while the deadlines pass
    stdout, stderr = blocked.communicate(timeout=60)
    assert blocked.returncode == 1, stderr
    stale = counted(stderr.decode(), "not acked: their ack deadline had passed")
    assert stale >= 1 and b"Traceback" not in stderr
    assert counted(stderr.decode(), "acked") + stale == len(stdout.splitlines())
    again = ok(at(bus, "pull", queue, "--max", "3", "--wait", "10", "--ack", "--json"))
    attempts = [row["attempt"] for row in json_lines(again.stdout)]
    assert len(attempts) >= stale and max(attempts) >= 2


def test_a_reader_that_stops_early_ends_the_pull_quietly(bus: DaemonProcess) -> None:
    queue = unique("brief")  # ack deadline 1 s
    publish_many(bus, queue, 100, b"y" * 20_000)  # 2 MB: more than the pipe holds
    head = piped_pull(bus, queue, "--max", "100", "--wait", "10", "--ack")
    assert head.stdout is not None and head.stderr is not None
    assert head.stdout.readline().count(b"\t") == 4  # `| head -1`
    head.stdout.close()
    status = head.wait(60)
    stderr = head.stderr.read().decode()
    assert status == 141, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr
    acked, left = counted(stderr, "acked"), counted(stderr, "message\\(s\\) left handed out")
    assert 1 <= acked < 100 and left >= 1  # what was written into the pipe is acked, no more
    back: list[str] = []

    def all_back() -> bool:  # the ones left handed out, after their deadline, and the rest
        rest = ok(at(bus, "pull", queue, "--max", "200", "--wait", "2", "--ack"))
        back.extend(line.split("\t")[0] for line in rest.stdout.splitlines())
        return len(back) >= 100 - acked

    wait_until(all_back, what="every message not written into the pipe back")
    assert len(set(back)) == len(back) == 100 - acked
    assert ok(at(bus, "pull", queue, "--wait", "2")).stdout == ""


def test_publish_to_a_topic_and_with_a_delay(bus: DaemonProcess) -> None:
    topic, group = unique("news"), unique("readers")
    assert ok(at(bus, "pull", group, "--topic", topic, "--wait", "0.2")).stdout == ""  # binds
    published = ok(at(bus, "publish", "--topic", topic, "-", stdin="headline"))
    pulled = ok(at(bus, "pull", group, "--topic", topic, "--wait", "10", "--ack", "--json"))
    [row] = json_lines(pulled.stdout)
    assert row["message_id"] == published.stdout.strip() and row["data"] == "headline"

    later = unique("later")
    delayed = ok(at(bus, "publish", later, "--data", "in an hour", "--delay", "3600"))
    assert uuid.UUID(delayed.stdout.strip())
    assert ok(at(bus, "pull", later, "--wait", "0.5")).stdout == ""

    def counts() -> dict[str, Any] | None:
        result = at(bus, "queues", later, "--json")
        return json_lines(result.stdout)[0] if result.returncode == 0 else None

    row = wait_until(lambda: (c := counts()) and c["delayed"] == 1 and c, what="delayed 1")
    assert row["ready"] == 0 and row["dead_letters"] == 0


def test_publish_twice_with_a_dedup_id_prints_the_first_id(bus: DaemonProcess) -> None:
    queue = unique("dedup")
    first = ok(at(bus, "publish", queue, "--data", "x", "--dedup-id", "order-17"))
    second = ok(at(bus, "publish", queue, "--data", "x", "--dedup-id", "order-17"))
    assert second.stdout == first.stdout
    assert "not stored again" in second.stderr and "not stored again" not in first.stderr


HOSTILE = "one\ttwo\nforged\trecord\r\x1b]52;c;cHduZWQ=\x07\\x1b \u202e\x85 é"
HOSTILE_TEXT = "one\\ttwo\\nforged\\trecord\\r\\x1b]52;c;cHduZWQ=\\x07\\\\x1b \\u202e\\x85 é"


def test_text_output_escapes_control_characters_and_json_keeps_them() -> None:
    assert output.escape(HOSTILE) == HOSTILE_TEXT
    assert output.escape("plain text, é, 日本") == "plain text, é, 日本"
    record = output.line({"id": "m1", "data": HOSTILE, "n": 2}, as_json=False)
    assert record.split("\t") == ["m1", HOSTILE_TEXT, "2"]
    assert json.loads(output.line({"data": HOSTILE}, as_json=True)) == {"data": HOSTILE}


def test_pull_and_dead_letters_print_a_hostile_body_on_one_line(bus: DaemonProcess) -> None:
    queue = unique("hostile")
    [message_id] = publish(bus, queue, HOSTILE.encode(), attributes={"k": "a\tb\nc"})
    pulled = ok(at(bus, "pull", queue, "--wait", "10", "--nack"))
    [line] = pulled.stdout.splitlines()
    assert "\x1b" not in pulled.stdout and "\x07" not in pulled.stdout
    fields = line.split("\t")
    assert fields[0] == message_id and fields[3:] == ["k=a\\tb\\nc", HOSTILE_TEXT]
    as_json = ok(at(bus, "pull", queue, "--wait", "30", "--json"))
    [row] = [json.loads(line) for line in as_json.stdout.split("\n") if line]  # raw U+0085
    assert row["data"] == HOSTILE and row["attributes"] == {"k": "a\tb\nc"}

    async def dead_letter(client: Client) -> None:
        assert await client.nack([row["ack_id"]], dead_letter=True) == []

    with_client(bus.grpc_address, dead_letter)
    listing = ["dead-letters", "list", "--config", str(bus.config_path), "--queue", queue]
    listed = wait_until(lambda: ok(eventbus(*listing)).stdout, what="the dead letter listed")
    [letter] = listed.splitlines()
    assert letter.split("\t")[0] == message_id and letter.split("\t")[-1] == HOSTILE_TEXT
    [document] = [json.loads(x) for x in ok(eventbus(*listing, "--json")).stdout.split("\n") if x]
    assert document["data"] == HOSTILE


# ---- queues and purge ------------------------------------------------------------------------


def test_queues_show_what_the_admin_api_counts(bus: DaemonProcess) -> None:
    queue, dead = unique("counts"), unique("dead")
    publish(bus, queue, *(b"m%d" % i for i in range(5)))
    pull_with_client(bus, queue, 2)  # two in flight, three ready

    async def dead_letter(client: Client) -> None:
        await client.publish_batch([OutboundMessage(b"bad", queue=dead)])
        [message] = await client.pull(dead, 1, wait_seconds=5)
        assert await client.nack([message.ack_id], dead_letter=True) == []

    with_client(bus.grpc_address, dead_letter)

    def settled() -> dict[str, dict[str, Any]] | None:
        rows = {row["queue"]: row for row in json_lines(ok(at(bus, "queues", "--json")).stdout)}
        done = rows.get(queue, {}).get("in_flight") == 2 and rows.get(dead, {}).get("dead_letters")
        return rows if done else None

    rows = wait_until(settled, what="in flight 2 and a dead letter")
    assert rows[queue]["ready"] == 3 and rows[queue]["delayed"] == 0
    assert rows[queue]["consumers"] >= 1  # the node consumes the queue since the pull
    assert rows[dead]["dead_letters"] == 1 and rows[dead]["ready"] == 0

    table = ok(at(bus, "queues", queue, dead)).stdout.splitlines()
    assert table[0].split() == [
        "QUEUE",
        "READY",
        "IN_FLIGHT",
        "DELAYED",
        "DEAD_LETTERS",
        "CONSUMERS",
    ]
    assert table[1].split()[:5] == [queue, "3", "2", "0", "0"]
    assert table[2].split()[:5] == [dead, "0", "0", "0", "1"]


def test_purge_removes_the_ready_messages(bus: DaemonProcess) -> None:
    first, second = unique("purged"), unique("purged")
    publish(bus, first, b"a", b"b", b"c")
    publish(bus, second, b"d")
    result = ok(at(bus, "purge", first, second))
    assert result.stdout.splitlines() == [f"{first}\t3 purged", f"{second}\t1 purged"]
    assert result.stderr == ""  # no bar off a terminal
    assert ok(at(bus, "pull", first, "--wait", "0.5")).stdout == ""
    counts = json_lines(ok(at(bus, "queues", first, second, "--json")).stdout)
    assert [row["ready"] for row in counts] == [0, 0]


# ---- errors ------------------------------------------------------------------------------------


def test_refusals_are_one_line_with_status_1(bus: DaemonProcess) -> None:
    one_error_line(at(bus, "publish", "amq.reserved", "--data", "x"), 1, "INVALID_ARGUMENT: ")
    one_error_line(at(bus, "queues", unique("absent")), 1, "NOT_FOUND: ")
    one_error_line(at(bus, "purge", unique("absent")), 1, "NOT_FOUND: ")
    one_error_line(at(bus, "pull", "", "--wait", "0"), 1, "INVALID_ARGUMENT: ")


def test_an_unreachable_daemon_is_status_3() -> None:
    address = f"127.0.0.1:{servers.closed_port()}"
    for args in (["publish", "q", "--data", "x"], ["pull", "q"], ["queues"], ["purge", "q"]):
        one_error_line(eventbus(*args, "--server", address), 3, f"cannot reach {address}: ")


def test_usage_errors_are_status_2(tmp_path: Path) -> None:
    for args in (
        ["publish", "q"],  # no data
        ["publish", "--data", "x"],  # no queue or topic
        ["publish", "q", "--topic", "t", "--data", "x"],
        ["publish", "q", "--attr", "novalue", "--data", "x"],
        ["pull", "q", "--max", "0"],
        ["pull", "q", "--ack", "--nack"],
        ["publish", "q", "--file", str(tmp_path / "absent")],
    ):
        result = eventbus(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "usage: eventbus" in result.stderr and "Traceback" not in result.stderr
    missing = str(tmp_path / "absent-token")
    one_error_line(eventbus("queues", "--token-file", missing), 2, "--token-file")
    one_error_line(eventbus("queues", "--server", "nowhere"), 2, "--server")


def test_an_unexpected_failure_is_one_line_and_status_1(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(target: remote.Remote, args: argparse.Namespace) -> int:
        raise ValueError("a bug\nwith a second line")

    caplog.set_level(logging.DEBUG, logger=remote.__name__)
    args = cli._parser().parse_args(["queues", "--server", "127.0.0.1:1"])
    assert remote.run(broken, args) == 1
    assert (
        capsys.readouterr().err == "eventbus: unexpected ValueError: a bug\\nwith a second line\n"
    )
    [record] = [r for r in caplog.records if r.name == remote.__name__]
    assert record.levelno == logging.DEBUG and record.exc_info is not None


# ---- tokens ----------------------------------------------------------------------------------

TOKENS = {"writer": secrets.token_urlsafe(32), "ops": secrets.token_urlsafe(32)}


@pytest.fixture(scope="module")
def guarded(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    def digest(name: str) -> str:
        return hashlib.sha256(TOKENS[name].encode()).hexdigest()

    auth = auth_table(
        "token",
        writer={"token_sha256": digest("writer"), "publish": ["sec.*"], "subscribe": ["sec.*"]},
        ops={"token_sha256": digest("ops"), "admin": True},
    )
    directory = tmp_path_factory.mktemp("cli-auth") / "node0"
    with module_daemon(amqp_url, directory, auth=auth, **QUICK) as daemon:
        yield daemon


def test_tokens_from_the_option_a_file_and_the_environment(
    guarded: DaemonProcess, tmp_path: Path
) -> None:
    queue = unique("sec")
    one_error_line(at(guarded, "publish", queue, "--data", "x"), 1, "UNAUTHENTICATED: ")
    wrong = at(guarded, "publish", queue, "--data", "x", "--token", "not-a-token")
    one_error_line(wrong, 1, "UNAUTHENTICATED: ")
    published = ok(at(guarded, "publish", queue, "--data", "x", "--token", TOKENS["writer"]))

    env = {"EVENTBUS_TOKEN": TOKENS["writer"]}
    pulled = ok(at(guarded, "pull", queue, "--wait", "10", "--ack", "--json", env=env))
    assert json_lines(pulled.stdout)[0]["message_id"] == published.stdout.strip()

    writer_file, ops_file = tmp_path / "writer", tmp_path / "ops"
    writer_file.write_text(TOKENS["writer"] + "\n")
    ops_file.write_text(TOKENS["ops"] + "\n")
    refused = at(guarded, "queues", queue, "--token-file", str(writer_file))
    one_error_line(refused, 1, "PERMISSION_DENIED: ")
    listed = ok(at(guarded, "queues", queue, "--json", "--token-file", str(ops_file)))
    assert json_lines(listed.stdout)[0]["queue"] == queue


# ---- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    directory = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(directory / "ca", "bus CA"), make_ca(directory / "other", "other CA")
    return {
        "ca": ca,
        "other": other,
        "server": issue(ca, "bus"),
        "orders": issue(ca, "orders-service", client=True),
    }


@pytest.fixture(scope="module")
def mtls(
    amqp_url: str, tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Issued]
) -> Iterator[DaemonProcess]:
    tls = {
        "cert_file": str(pki["server"].cert_file),
        "key_file": str(pki["server"].key_file),
        "client_ca_file": str(pki["ca"].cert_file),
    }
    orders = {"certificate_subject": "CN=orders-service", "publish": ["orders.*"]}
    auth = auth_table("mtls", orders_service=orders)
    directory = tmp_path_factory.mktemp("cli-mtls") / "node0"
    with module_daemon(amqp_url, directory, tls=tls, auth=auth, **QUICK) as daemon:
        yield daemon


def test_mtls_with_a_client_certificate(mtls: DaemonProcess, pki: dict[str, Issued]) -> None:
    queue = unique("orders")
    ca, client = str(pki["ca"].cert_file), pki["orders"]
    cert = ["--tls-cert", str(client.cert_file), "--tls-key", str(client.key_file)]
    published = ok(at(mtls, "publish", queue, "--data", "x", "--tls-ca", ca, *cert))
    assert uuid.UUID(published.stdout.strip())
    one_error_line(at(mtls, "publish", queue, "--data", "x"), 3, "cannot reach")  # plaintext
    wrong_ca = at(mtls, "publish", queue, "--data", "x", "--tls-ca", str(pki["other"].cert_file))
    one_error_line(wrong_ca, 3, "CERTIFICATE_VERIFY_FAILED")
    refused = at(mtls, "pull", queue, "--tls-ca", ca, *cert)  # may publish, not subscribe
    one_error_line(refused, 1, "PERMISSION_DENIED: ")
    one_error_line(at(mtls, "queues", "--tls-cert", str(client.cert_file)), 2, "--tls-key")
