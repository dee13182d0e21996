"""amqp.queue_type = "quorum" against this machine's RabbitMQ (quorum queues work on one node):
every durable queue the bus declares is a quorum queue, and every feature works on them; a queue
that exists as the other type is refused as FAILED_PRECONDITION naming it and how to migrate,
and the daemon goes on; its own queues of the other type stop its start in one line.

Each test has a virtual host of its own (own_vhost), so queue types never clash across tests.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import grpc
import pytest

from eventbus.config import AmqpConfig
from eventbus.delivery.envelope import Envelope
from eventbus.delivery.publisher import outcome_of, queue_arguments, type_mismatch
from eventbus.errors import InvalidArgument, QueueTypeMismatch
from tests.bus_client import BusClient, status_of
from tests.servers import unique_name
from tests.v2_client import V2Client, message
from tests.v2_support import dead_letters, dead_letters_of, eventually, quick

pytestmark = pytest.mark.own_vhost


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:]) or "/"


def queues(amqp_url: str) -> dict[str, tuple[str, bool]]:
    """{name: (type, exclusive)} of every queue in the URL's virtual host."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost_of(amqp_url), "name", "type", "exclusive"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
    return {row[0]: (row[1], row[2] == "true") for row in rows if row[0] != "name"}


def declare_classic(amqp_url: str, queue: str) -> None:
    """Declare queue as a plain durable classic queue, as an older bus (or anyone) did."""

    async def declare() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True)

    asyncio.run(declare())


def replace_with_classic(amqp_url: str, queue: str) -> None:
    """Delete queue (whatever its type) and declare it anew as a plain classic queue: a
    migration under way, as an operator might run it."""

    async def replace() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.declare_queue(queue, durable=True)

    asyncio.run(replace())


def drain_and_delete(amqp_url: str, queue: str) -> list[str]:
    """The data of every message waiting in queue (as the bus would hand it out), then the
    queue deleted: an operator's drain of the old queue."""

    async def drain() -> list[str]:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            data = []
            while (message := await declared.get(no_ack=True, fail=False)) is not None:
                data.append(Envelope.from_amqp(message).body.decode())
            await declared.delete(if_unused=False, if_empty=False)
            return data

    return asyncio.run(drain())


def delayed_rows(postgres_dsn: str, target: str) -> list[dict[str, Any]]:
    async def fetch() -> list[dict[str, Any]]:
        connection = await asyncpg.connect(postgres_dsn)
        try:
            rows = await connection.fetch(
                "SELECT quarantined_at, publish_failures, last_failure FROM delayed_messages "
                "WHERE target = $1",
                target,
            )
        finally:
            await connection.close()
        return [dict(row) for row in rows]

    return asyncio.run(fetch())


def test_a_queue_of_the_other_type_is_unavailable_to_the_jobs_not_refused() -> None:
    mismatch = QueueTypeMismatch(type_mismatch("orders", "quorum", internal=False))
    assert outcome_of(mismatch).status == "unavailable"  # waits for the migration
    assert outcome_of(InvalidArgument("a name pamqp refuses")).status == "refused"


def test_queue_arguments_by_type_and_expiry() -> None:
    classic = AmqpConfig(queue_idle_expiry_seconds=60)
    quorum = AmqpConfig(queue_type="quorum", queue_idle_expiry_seconds=60)
    assert queue_arguments(AmqpConfig(), internal=False) == {}  # as before: no x-queue-type
    assert queue_arguments(classic, internal=False) == {"x-expires": 60_000}
    assert queue_arguments(classic, internal=True) == {}
    assert queue_arguments(quorum, internal=False) == {
        "x-queue-type": "quorum",
        "x-expires": 60_000,
    }
    assert queue_arguments(quorum, internal=True) == {"x-queue-type": "quorum"}
    assert "x-delivery-limit" not in queue_arguments(quorum, internal=False)  # 3.x, or unknown


def test_a_type_mismatch_says_what_and_how_to_migrate_in_one_line() -> None:
    client = type_mismatch("orders", "quorum", internal=False)
    assert client.startswith("queue 'orders' exists as a classic queue, but amqp.queue_type is")
    assert "new quorum queue" in client and "shovel" in client and "drain" in client
    own = type_mismatch("event_bus.ack", "classic", internal=True)
    assert "exists as a quorum queue" in own and "amqp.namespace" in own
    assert "\n" not in client + own


@pytest.fixture
def daemon(make_daemon: Any) -> Any:
    started = make_daemon(
        **quick(
            amqp={"queue_type": "quorum", "queue_idle_expiry_seconds": 3600},
            delivery={"max_retries": 1},
            queues={"dlq.*": {"max_retries": 0, "dead_letter_queue": "dlq-dead"}},
        )
    )
    started.wait_ready()
    return started


@pytest.fixture
def client(daemon: Any) -> Any:
    bus = BusClient(daemon.grpc_address)
    yield bus
    bus.close()


def test_every_durable_queue_the_bus_declares_is_quorum(
    daemon: Any, client: BusClient, backends: Any
) -> None:
    client.publish("plain", "x")
    client.topic_publish("news", "first")  # no group bound yet: goes nowhere
    assert client.try_topic_subscribe("news", "news-readers", timeout=1) is None  # binds
    declared = queues(backends.amqp_url)
    ns = backends.namespace
    for name in ("plain", "news-readers", f"{ns}.confirm", f"{ns}.ack", f"{ns}.delay"):
        assert declared[name] == ("quorum", False), (name, declared)
    # The rebalance watcher's queue: exclusive and server-named, which quorum cannot be.
    own = [kind for name, kind in declared.items() if name.startswith("amq.gen-")]
    assert own == [("classic", True)], declared


def test_publish_subscribe_ack(client: BusClient) -> None:
    for i in range(5):
        client.publish("work", f"m{i}")
    got = []
    for _ in range(5):
        reply = client.subscribe("work")
        client.ack(reply.id)
        got.append(reply.data)
    assert sorted(got) == [f"m{i}" for i in range(5)]
    assert client.try_subscribe("work", timeout=1.5) is None  # acked: gone for good


def test_nack_brings_it_back_and_past_max_retries_it_is_a_dead_letter(
    client: BusClient, backends: Any
) -> None:
    client.publish("flaky", "retry me")
    first = client.subscribe("flaky")
    client.nack(first.id)
    second = client.subscribe("flaky")
    assert second.data == "retry me" and second.id != first.id
    client.nack(second.id)  # max_retries 1: that was the last try
    (dead,) = dead_letters_of(backends.postgres_dsn, "flaky", 1)
    assert dead["body"] == b"retry me" and dead["attempts"] == 2
    assert client.try_subscribe("flaky", timeout=1.5) is None


def test_dead_letters_also_go_to_a_dead_letter_queue(client: BusClient, backends: Any) -> None:
    client.publish("dlq.orders", "poison")
    client.nack(client.subscribe("dlq.orders").id)  # max_retries 0 for dlq.*
    dead_letters_of(backends.postgres_dsn, "dlq.orders", 1)
    reply = client.subscribe("dlq-dead", timeout=15)
    client.ack(reply.id)
    assert reply.data == "poison"
    assert queues(backends.amqp_url)["dlq-dead"] == ("quorum", False)


def test_delay_is_never_early(client: BusClient) -> None:
    sent = time.monotonic()
    client.delay_publish("later", "wait", delay=2)
    reply = client.subscribe("later", timeout=15)
    client.ack(reply.id)
    assert reply.data == "wait"
    assert time.monotonic() - sent >= 2


def test_an_expired_message_is_never_handed_out(client: BusClient) -> None:
    client.publish("short", "stale", ttl=1)
    time.sleep(2)
    client.publish("short", "fresh", ttl=60)
    reply = client.subscribe("short")
    client.ack(reply.id)
    assert reply.data == "fresh"
    assert client.try_subscribe("short", timeout=1.5) is None


def test_every_group_of_a_topic_gets_every_message(client: BusClient) -> None:
    for group in ("billing", "audit"):
        assert client.try_topic_subscribe("orders", group, timeout=1) is None  # binds
    client.topic_publish("orders", "order 1")
    for group in ("billing", "audit"):
        reply = client.topic_subscribe("orders", group)
        client.topic_ack(reply.id)
        assert reply.data == "order 1"
    assert client.try_topic_subscribe("orders", "billing", timeout=1.5) is None


def test_v2_publish_and_streaming_pull_with_acks_and_a_nack(daemon: Any) -> None:
    v2 = V2Client(daemon.grpc_address)
    try:
        queue = unique_name("v2")
        results = v2.publish(*[message(queue, f"m{i}".encode()) for i in range(10)])
        stream = v2.stream(queue, max_outstanding_messages=100)
        got = stream.receive(10)
        assert sorted(m.message_id for m in got) == sorted(r.message_id for r in results)
        stream.send(ack_ids=[m.ack_id for m in got[1:]], nack_ids=[got[0].ack_id])
        (again,) = stream.receive(1)
        assert again.message_id == got[0].message_id and again.attempt == 2
        stream.send(ack_ids=[again.ack_id])
        assert stream.quiet_for(1.0) == []
        stream.cancel()
    finally:
        v2.close()


def test_a_queue_of_the_other_type_is_refused_and_the_daemon_goes_on(
    daemon: Any, client: BusClient, backends: Any
) -> None:
    declare_classic(backends.amqp_url, "legacy")
    for call in (
        lambda: client.publish("legacy", "x"),
        lambda: client.subscribe("legacy", timeout=5),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "queue 'legacy' exists as a classic queue" in details
        assert "amqp.queue_type is quorum" in details and "shovel" in details
    v2 = V2Client(daemon.grpc_address)
    try:
        code, details = status_of(lambda: v2.publish(message("legacy", b"x")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'legacy'" in details
        v2.publish(message("fine-v2", b"y"))  # the publishing channels are intact
    finally:
        v2.close()
    for i in range(20):  # many messages over every channel of the shared pool
        client.publish("fine", f"m{i}")
    got = []
    for _ in range(20):
        reply = client.subscribe("fine")
        client.ack(reply.id)
        got.append(reply.data)
    assert sorted(got) == sorted(f"m{i}" for i in range(20))
    assert daemon.http_get("/readyz")[0] == 200
    assert daemon.process.poll() is None
    assert "RabbitMQ: connection" not in daemon.log  # no connection was lost over it
    assert queues(backends.amqp_url)["legacy"] == ("classic", False)  # left as it was


def test_retries_and_delayed_messages_wait_while_their_queue_is_of_the_other_type(
    client: BusClient, backends: Any
) -> None:
    """A queue migrated meanwhile (here: classic for a while): its retry due is not a dead
    letter, its delayed message is not quarantined; both go once the queue is right again."""
    client.publish("moving", "retry me")
    first = client.subscribe("moving")
    client.delay_publish("moving", "later", delay=1)
    replace_with_classic(backends.amqp_url, "moving")
    client.nack(first.id)  # due again at once, max_retries 1: one retry left
    time.sleep(3)  # the crons tried both, a tick every 0.2 s
    # Each either waits in PostgreSQL (its declaration refused: the queue is classic now) or,
    # published without a declaration (this node had declared the queue before the change),
    # went to the classic queue; none is quarantined or dead.
    rows = delayed_rows(backends.postgres_dsn, "moving")
    assert all(row["quarantined_at"] is None for row in rows), rows
    assert all("exists as a classic queue" in (row["last_failure"] or "") for row in rows), rows
    assert dead_letters(backends.postgres_dsn, "moving") == []
    # A publish whose queue this node had declared before the change went to the classic
    # queue (it is not declared again each time): the operator drains that one, then deletes
    # it, and the bus declares it again, as quorum, for the rest.
    got = drain_and_delete(backends.amqp_url, "moving")
    time.sleep(1.5)  # past the 1 s a refused declaration is remembered
    while len(got) < 2:
        reply = client.subscribe("moving", timeout=40)
        client.ack(reply.id)
        got.append(reply.data)
    assert sorted(got) == ["later", "retry me"]
    assert client.try_subscribe("moving", timeout=2) is None  # and neither came twice
    assert dead_letters(backends.postgres_dsn, "moving") == []
    assert queues(backends.amqp_url)["moving"] == ("quorum", False)


def test_the_bus_s_own_queue_of_the_other_type_stops_the_start_in_one_line(
    make_daemon: Any, backends: Any
) -> None:
    declare_classic(backends.amqp_url, f"{backends.namespace}.ack")
    daemon = make_daemon(amqp={"queue_type": "quorum"})
    assert daemon.wait_exit(30) == 1
    errors = [line for line in daemon.log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, daemon.log
    assert f"queue '{backends.namespace}.ack' exists as a classic queue" in errors[0]
    assert "cannot start" in errors[0] and "the bus's own queues" in errors[0]
    assert "Traceback" not in daemon.log


def test_a_classic_bus_refuses_a_quorum_queue_alike(make_daemon: Any, backends: Any) -> None:
    quorum = make_daemon(amqp={"queue_type": "quorum"})
    quorum.wait_ready()
    BusClient(quorum.grpc_address).publish("typed", "x")
    quorum.stop()
    classic = make_daemon(amqp={"namespace": f"{backends.namespace}_classic"})  # own queues anew
    classic.wait_ready()
    code, details = status_of(lambda: BusClient(classic.grpc_address).publish("typed", "y"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "queue 'typed' exists as a quorum queue, but amqp.queue_type is classic" in details
    eventually(lambda: classic.http_get("/readyz")[0], lambda status: status == 200)
