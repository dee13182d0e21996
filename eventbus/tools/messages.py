"""`eventbus publish` and `eventbus pull`: messages through a running daemon, over v2 gRPC with
the Python client."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..client import Client, OutboundMessage, PublishResult, ReceivedMessage
from . import output, remote

PULL_BATCH = 1000  # the daemon's most messages in one Pull
SETTLE_MOST = 10_000  # the daemon's most ack ids in one Acknowledge or Nack
LATER_WAIT = 0.2  # seconds later pulls wait, once the first brought something


def add_commands(commands: Any) -> None:
    _add_publish(commands)
    _add_pull(commands)


# ---- publish ---------------------------------------------------------------------------------


def _add_publish(commands: Any) -> None:
    summary = "publish one message to a queue or topic; prints its message id"
    sub: argparse.ArgumentParser = commands.add_parser("publish", help=summary, description=summary)
    sub.add_argument("queue", nargs="?", metavar="QUEUE", help="the queue (or give --topic)")
    sub.add_argument(
        "stdin", nargs="?", choices=["-"], metavar="-", help="read the data from standard input"
    )
    sub.add_argument("--topic", help="publish to this topic instead of a queue")
    source = sub.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="TEXT", help="the message's data")
    source.add_argument("--file", metavar="FILE", help="the data is this file's bytes")
    sub.add_argument("--delay", type=_seconds, default=0, metavar="N", help="due in N seconds")
    sub.add_argument("--ttl", type=_seconds, default=0, metavar="N", help="dropped after N s")
    sub.add_argument("--attr", type=_attribute, action="append", default=[], metavar="KEY=VALUE")
    sub.add_argument("--dedup-id", default="", help="published once within the dedup window")
    remote.add_options(sub)
    sub.set_defaults(remote=publish, check=_check_publish, parser=sub)


def _seconds(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _attribute(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _check_publish(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One target and one source of data; the data read now (a file that cannot be read is a
    usage error)."""
    if args.topic and args.queue == "-" and args.stdin is None:
        args.queue, args.stdin = None, "-"
    if bool(args.queue) == bool(args.topic):
        parser.error("name a QUEUE or --topic (one of them)")
    sources = [s for s in (args.data is not None, args.file is not None, args.stdin) if s]
    if len(sources) != 1:
        parser.error("give the data as --data TEXT, --file FILE or - (standard input)")
    args.body = _body(parser, args)


def _body(parser: argparse.ArgumentParser, args: argparse.Namespace) -> bytes:
    if args.data is not None:
        return str(args.data).encode()
    if args.stdin or args.file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(args.file).read_bytes()
    except OSError as error:
        parser.error(f"--file {args.file}: {error.strerror}")


async def publish(target: remote.Remote, args: argparse.Namespace) -> int:
    message = OutboundMessage(
        args.body,
        queue=args.queue or "",
        topic=args.topic or "",
        attributes=dict(args.attr),
        ttl_seconds=args.ttl,
        delay_seconds=args.delay,
        dedup_id=args.dedup_id,
    )

    async def send(client: Client) -> PublishResult:
        [result] = await client.publish_batch([message])
        return result

    result = await remote.with_client(target, send)
    print(result.message_id)
    if result.duplicate:
        print(
            "eventbus: not stored again: a message with this dedup id was (its id is printed)",
            file=sys.stderr,
        )
    return remote.EXIT_OK


# ---- pull ------------------------------------------------------------------------------------


def _add_pull(commands: Any) -> None:
    summary = (
        "pull messages and print them; without --ack or --nack they stay handed out and come "
        "back when their ack deadline passes"
    )
    sub: argparse.ArgumentParser = commands.add_parser("pull", help=summary, description=summary)
    sub.add_argument("queue", metavar="QUEUE", help="the queue (with --topic: the group bound)")
    sub.add_argument("--topic", default="", help="bind QUEUE to this topic (as subscribe does)")
    sub.add_argument("--max", type=int, default=1, metavar="N", help="at most N (default 1)")
    sub.add_argument(
        "--wait",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how long to wait for a first message (default 1; at most 300)",
    )
    settle = sub.add_mutually_exclusive_group()
    settle.add_argument("--ack", action="store_true", help="ack them once printed")
    settle.add_argument(
        "--nack", action="store_true", help="give them back once printed (their queue's backoff)"
    )
    sub.add_argument("--json", action="store_true", help="one JSON object a line, with ack ids")
    remote.add_options(sub)
    sub.set_defaults(remote=pull, check=_check_pull, parser=sub)


def _check_pull(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max < 1:
        parser.error("--max must be at least 1")
    if not 0 <= args.wait <= 300:
        parser.error("--wait must be 0-300 seconds")


async def pull(target: remote.Remote, args: argparse.Namespace) -> int:
    """Pull batch by batch, printing each batch and then acking or nacking it (printed first:
    a message is never acked unseen; settled before the next pull, so that no deadline lapses
    while more are pulled). Status 1 when some acks came after their deadline."""
    tally = _Tally()

    async def session(client: Client) -> None:
        try:
            await _pull_and_settle(client, args, tally)
        finally:
            if tally.pulled:
                _report(tally, args)
        if not tally.pulled:
            print("eventbus: no message", file=sys.stderr)

    await remote.with_client(target, session)
    return remote.EXIT_REFUSED if args.ack and tally.stale else remote.EXIT_OK


@dataclass
class _Tally:
    """What a pull did so far: pulled, settled, refused as stale, and left handed out."""

    pulled: int = 0
    settled: int = 0
    stale: int = 0
    left: int = 0
    soonest: datetime | None = None  # the earliest deadline of those left

    def leave(self, messages: list[ReceivedMessage]) -> None:
        self.left += len(messages)
        for deadline in (m.deadline for m in messages if m.deadline is not None):
            self.soonest = deadline if self.soonest is None else min(self.soonest, deadline)


async def _pull_and_settle(client: Client, args: argparse.Namespace, tally: _Tally) -> None:
    """(asyncio side) Pull until --max messages or a pull brings none; the first waits up to
    --wait seconds, later ones briefly (a pull returns what the node has at hand). Each batch
    is printed, then settled; BrokenPipeError once standard output's reader is gone (what was
    written before is settled, the rest left handed out)."""
    while tally.pulled < args.max:
        wait = min(args.wait, LATER_WAIT) if tally.pulled else args.wait
        most = min(args.max - tally.pulled, PULL_BATCH)
        batch = await client.pull(args.queue, most, wait, topic=args.topic)
        if not batch:
            return
        tally.pulled += len(batch)
        written = _print_each(batch, args.json)
        await _settle(client, batch[:written], args, tally)
        if written < len(batch):
            tally.leave(batch[written:])
            raise BrokenPipeError("standard output closed")


def _print_each(messages: list[ReceivedMessage], as_json: bool) -> int:
    """Print the messages one a line; how many were written before standard output's reader
    went away (all of them unless it did)."""
    for index, message in enumerate(messages):
        try:
            print(output.line(_fields(message, as_json), as_json=as_json), flush=True)
        except BrokenPipeError:
            return index
    return len(messages)


async def _settle(
    client: Client, messages: list[ReceivedMessage], args: argparse.Namespace, tally: _Tally
) -> None:
    """(asyncio side) Ack or nack the messages (as many calls as the daemon's limit on ids in
    one takes), or leave them handed out without --ack or --nack."""
    if not (args.ack or args.nack):
        tally.leave(messages)
        return
    ids = [message.ack_id for message in messages]
    for start in range(0, len(ids), SETTLE_MOST):
        chunk = ids[start : start + SETTLE_MOST]
        invalid = await (client.acknowledge(chunk) if args.ack else client.nack(chunk))
        tally.settled += len(chunk) - len(invalid)
        tally.stale += len(invalid)


def _fields(message: ReceivedMessage, full: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"message_id": message.message_id}
    if full:
        fields |= {"ack_id": message.ack_id, "queue": message.queue}
    fields |= {"attempt": message.attempt, "publish_time": _iso(message.publish_time)}
    if full:
        fields |= {"deadline": _iso(message.deadline), "attributes": message.attributes}
    else:
        fields["attributes"] = ",".join(f"{k}={v}" for k, v in sorted(message.attributes.items()))
    return fields | output.data(message.data)


def _iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else ""


def _report(tally: _Tally, args: argparse.Namespace) -> None:
    """What the pull settled and what it left, on standard error."""
    done = "acked" if args.ack else "nacked"
    if args.ack or args.nack:
        print(f"eventbus: {done} {tally.settled} message(s)", file=sys.stderr)
    if tally.stale:
        print(
            f"eventbus: {tally.stale} not {done}: their ack deadline had passed; they come back "
            "(delivered again, or dead-lettered after their last retry)",
            file=sys.stderr,
        )
    if tally.left:
        when = f" ({tally.soonest.isoformat(timespec='seconds')})" if tally.soonest else ""
        print(
            f"eventbus: {tally.left} message(s) left handed out: they come back when their ack "
            f"deadline passes{when}; --ack or --nack settles them",
            file=sys.stderr,
        )
