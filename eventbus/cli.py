"""The eventbus command line: serve, migrate, dead-letters, delayed, token (with the config
file), and publish, pull, queues, purge, top (against a running daemon, eventbus.tools)."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from . import __version__
from .backends import aio, migrations, store
from .config import IDENTITY_NAME, Config, ConfigError, load
from .daemon import Daemon
from .delivery import validate
from .errors import CallError, FatalError, InvalidArgument
from .jobs import admin, deadletters, delay
from .ops.reload import set_log_level
from .tools import messages, output, progress, queues, remote, top

logger = logging.getLogger("eventbus")

EXIT_FATAL = 1
EXIT_CONFIG = 2


class RequeueIncomplete(FatalError):
    """`dead-letters requeue` left some dead letters behind (RabbitMQ did not take them)."""


class NothingToCancel(FatalError):
    """`delayed cancel` named a message that is not pending (moved already, or never was)."""


class NothingToRelease(FatalError):
    """`delayed release` named a message that is not quarantined."""


Command = Callable[[Config, argparse.Namespace], Awaitable[None]]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, and return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if hasattr(args, "remote"):  # a command against a running daemon
        if hasattr(args, "check"):
            args.check(args.parser, args)  # the command's own parser: its usage on an error
        return remote.run(args.remote, args)
    _check_arguments(parser, args)
    if args.command is _new_token:
        _new_token(args)
        return 0
    try:
        config = load(args.config)
    except ConfigError as error:
        print(f"eventbus: {error}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(config)
    status = 0
    try:
        trio.run(args.command, config, args)
    except* (FatalError, CallError) as group:
        for fatal in remote.leaves(group):
            logger.error("%s", fatal)
        status = EXIT_FATAL
    except* BrokenPipeError:  # `eventbus dead-letters list | head -1`
        status = remote.stdout_gone()
    return status


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say itself; parser.error exits with status 2 and the usage."""
    if args.command is _new_token and not IDENTITY_NAME.fullmatch(args.name):
        parser.error(
            f"token new: NAME must be 1-64 of A-Z a-z 0-9 _ . - (as in "
            f"[auth.identities.NAME]), got {args.name!r}"
        )
    if args.command is _requeue_dead_letters and not (args.all or args.queue or args.message_id):
        parser.error("dead-letters requeue: name --queue, --message-id or --all")
    if args.command is _release_delayed and (args.id is None) == (not args.all):
        parser.error("delayed release: name an ID or --all")
    if args.command is _cancel_delayed:
        _check_cancel(parser, args)
    if args.command is _release_delayed and args.id is not None:
        try:
            validate.delivery_id(args.id)
        except InvalidArgument as error:
            parser.error(f"delayed {args.action}: {error.message}")
    if args.command is _delete_dead_letters and not (args.queue or args.message_id):
        parser.error("dead-letters delete: name --queue or --message-id")
    dead_letters = (_list_dead_letters, _requeue_dead_letters, _delete_dead_letters)
    if args.command in dead_letters and args.message_id is not None:
        try:
            validate.delivery_id(args.message_id)
        except InvalidArgument:
            parser.error(f"dead-letters: --message-id {args.message_id!r} is not a message id")


def _check_cancel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """IDs (or - for standard input) or --all, not both; the ids read and checked now."""
    if bool(args.ids) == args.all:
        parser.error("delayed cancel: name IDs, - (ids on standard input) or --all")
    if (args.queue or args.topic) and not args.all:
        parser.error("delayed cancel: --queue and --topic go with --all")
    named = sys.stdin.read().split() if args.ids == ["-"] else args.ids
    ids = []
    for index, value in enumerate(named):
        try:
            ids.append(validate.delivery_id(value))
        except InvalidArgument:
            parser.error(f"delayed cancel: ID {index + 1} {value[:64]!r} is not a message id")
    if args.ids and not ids:
        parser.error("delayed cancel: no ids on standard input")
    args.ids = ids


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbus", description="A message bus daemon for microservices, over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"eventbus {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    _command(commands, "serve", _serve, "run the daemon until SIGTERM or SIGINT")
    migrate = _command(
        commands, "migrate", _migrate, "bring the PostgreSQL schema up to date, then exit"
    )
    progress.add_option(migrate)
    letters = commands.add_parser(
        "dead-letters",
        help="list or requeue dead letters",
        description="list or requeue dead letters",
    )
    actions = letters.add_subparsers(required=True, metavar="ACTION")
    listing = _command(actions, "list", _list_dead_letters, "print dead letters, oldest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    again = _command(
        actions,
        "requeue",
        _requeue_dead_letters,
        "publish dead letters to their queue again, as fresh messages",
    )
    again.add_argument("--all", action="store_true", help="every dead letter")
    progress.add_option(again)
    forget = _command(
        actions, "delete", _delete_dead_letters, "forget dead letters for good (of a queue or ids)"
    )
    for sub in (listing, again, forget):
        sub.add_argument("--queue", help="only the dead letters of this queue")
        sub.add_argument("--message-id", help="only this message")
    _delayed_commands(commands)
    _token_commands(commands)
    messages.add_commands(commands)
    queues.add_commands(commands)
    top.add_command(commands)
    return parser


def _token_commands(commands: Any) -> None:
    token = commands.add_parser(
        "token", help="make bearer tokens", description="make bearer tokens for identities"
    )
    actions = token.add_subparsers(required=True, metavar="ACTION")
    summary = "print a fresh random token once, and the config.toml lines that admit it"
    new = actions.add_parser("new", help=summary, description=summary)
    new.add_argument("name", metavar="NAME", help="the identity's name in [auth.identities.NAME]")
    new.set_defaults(command=_new_token)


def _delayed_commands(commands: Any) -> None:
    delayed = commands.add_parser(
        "delayed",
        help="list, cancel or release delayed messages",
        description="list, cancel or release delayed messages",
    )
    actions = delayed.add_subparsers(required=True, metavar="ACTION")
    listing = _command(
        actions, "list", _list_delayed, "print pending delayed messages, soonest first"
    )
    target = listing.add_mutually_exclusive_group()
    target.add_argument("--queue", help="only those for this queue")
    target.add_argument("--topic", help="only those for this topic")
    listing.add_argument(
        "--quarantined", action="store_true", help="only those set aside, with the reason"
    )
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    cancel = _command(
        actions,
        "cancel",
        _cancel_delayed,
        "cancel pending delayed messages: by id, ids read from standard input (-), or --all",
    )
    cancel.add_argument(
        "ids", nargs="*", metavar="ID", help="ids `delayed list` shows; - reads them, one a line"
    )
    cancel.add_argument(
        "--all", action="store_true", help="every pending one (of --queue or --topic only)"
    )
    of = cancel.add_mutually_exclusive_group()
    of.add_argument("--queue", help="with --all: only those for this queue")
    of.add_argument("--topic", help="with --all: only those for this topic")
    progress.add_option(cancel)
    cancel.set_defaults(action="cancel", id=None)
    release = _command(
        actions,
        "release",
        _release_delayed,
        "put quarantined delayed messages back, to be published at the next tick",
    )
    release.add_argument("id", nargs="?", help="the id `delayed list --quarantined` shows")
    release.add_argument("--all", action="store_true", help="every quarantined delayed message")
    release.set_defaults(action="release")


def _command(commands: Any, name: str, run: Command, summary: str) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=summary)
    sub.add_argument(
        "--config",
        default="config.toml",
        metavar="FILE",
        help="the TOML configuration file (default: %(default)s)",
    )
    sub.set_defaults(command=run)
    return sub


async def _serve(config: Config, args: argparse.Namespace) -> None:
    await Daemon(config, config_path=args.config).serve()


async def _migrate(config: Config, args: argparse.Namespace) -> None:
    versions = [migration.version for migration in migrations.available()]
    with progress.bar("connecting to PostgreSQL", quiet=args.quiet, total=len(versions)) as bar:
        steps = _MigrationSteps(bar, versions)
        migrations.logger.addHandler(steps)
        try:
            async with aio.open_loop(lambda: None):
                window = config.amqp.reconnect_window_seconds
                db = await store.open_store(config.postgres, window=window)
                await db.close()
        finally:
            migrations.logger.removeHandler(steps)
        bar(len(versions), len(versions))
        bar.describe("schema up to date")
    logger.info("PostgreSQL schema is up to date")


class _MigrationSteps(logging.Handler):
    """Moves migrate's bar at each line the migrations module logs as it starts one (arguments:
    version, name); they run in one transaction and tell nothing else. At log.level warning
    there are no such lines, and the bar goes from nothing to done."""

    def __init__(self, bar: progress.Bar, versions: list[int]) -> None:
        super().__init__()
        self._bar = bar
        self._versions = versions

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 2 and args[0] in self._versions):
            return
        version, name = args
        self._bar(self._versions.index(args[0]), len(self._versions))
        self._bar.describe(f"applying migration {version:04d}_{name}")


TOKEN_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 random bits
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML keys that need no quotes


def _new_token(args: argparse.Namespace) -> None:
    """Print a new token and the [auth.identities.NAME] table holding only its SHA-256."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    digest = hashlib.sha256(token.encode()).hexdigest()
    key = args.name if BARE_KEY.fullmatch(args.name) else json.dumps(args.name)
    lines = [
        f"Token for {args.name}, shown only this once (send it as authorization: Bearer TOKEN):",
        token,
        "",
        "Add to config.toml (it keeps only the token's SHA-256), fill in the lists, reload:",
        f"[auth.identities.{key}]",
        f'token_sha256 = "{digest}"',
        'publish = []      # globs of queues and topics it may publish to, e.g. ["orders.*"]',
        "subscribe = []    # globs it may subscribe to, pull from, ack and nack",
        "admin = false     # true: v2 Admin, dead letters, delayed messages, /metrics, /stats",
    ]
    print("\n".join(lines))


def _configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(handlers=[handler], force=True)
    # grpclib logs each cancelled call, h2 and hpack each frame and header: lines a client
    # triggers at will, kept at warning or above. The daemon's own lines about them are
    # rate-limited.
    set_log_level(config.log.level)
    # aiormq logs every failed connect as an ERROR; the broker supervisor already reports each
    # attempt in one warning line, and the final failure once.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)


def _message_ids(args: argparse.Namespace) -> list[str]:
    return [] if args.message_id is None else [args.message_id]


async def _list_dead_letters(config: Config, args: argparse.Namespace) -> None:
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, config.amqp.reconnect_window_seconds)
        try:
            letters = await admin.list_dead_letters(
                db, config.amqp.namespace, args.queue, args.limit, ids=_message_ids(args)
            )
        finally:
            await db.close()
    for letter in letters:
        print(_format_letter(letter, as_json=args.json))


def _format_letter(letter: deadletters.DeadLetter, *, as_json: bool) -> str:
    fields = {
        "message_id": letter.message_id,
        "queue": letter.queue,
        "attempts": letter.attempts,
        "last_failure_at": letter.last_failure_at.isoformat(),
        "dead_at": letter.dead_at.isoformat(),
        "reason": letter.reason or "",
        **output.data(letter.body),
    }
    return output.line(fields, as_json=as_json)


async def _requeue_dead_letters(config: Config, args: argparse.Namespace) -> None:
    shown = progress.bar("requeueing dead letters", quiet=args.quiet)
    async with aio.open_loop(lambda: None), deadletters.connected(config) as (db, publisher):
        with shown as bar:
            moved, kept = await admin.requeue_dead_letters(
                db,
                publisher,
                config.amqp.namespace,
                args.queue,
                _message_ids(args),
                progress=bar if bar.shown else None,
            )
    logger.info("requeued %d dead letters", moved)
    if kept:
        raise RequeueIncomplete(f"{kept} dead letters could not be requeued and stay")


async def _delete_dead_letters(config: Config, args: argparse.Namespace) -> None:
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, config.amqp.reconnect_window_seconds)
        try:
            deleted = await admin.delete_dead_letters(
                db, config.amqp.namespace, args.queue, _message_ids(args)
            )
        finally:
            await db.close()
    logger.info("deleted %d dead letters", deleted)


async def _list_delayed(config: Config, args: argparse.Namespace) -> None:
    target = admin.delayed_target(args.queue, args.topic, config.amqp.namespace)
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, config.amqp.reconnect_window_seconds)
        try:
            rows = await admin.list_delayed(db, target, args.limit, quarantined=args.quarantined)
        finally:
            await db.close()
    for row in rows:
        fields = {
            "id": row.id,
            "kind": row.kind,
            "target": row.target,
            "due_at": row.due_at.isoformat(),
            "quarantined_at": row.quarantined_at.isoformat() if row.quarantined_at else "",
            "quarantine_reason": row.quarantine_reason or "",
            "publish_failures": row.publish_failures,
            "last_failure": row.last_failure or "",
            **output.data(row.body),
        }
        print(output.line(fields, as_json=args.json))


async def _cancel_delayed(config: Config, args: argparse.Namespace) -> None:
    namespace = config.amqp.namespace
    target = admin.delayed_target(args.queue, args.topic, namespace) if args.all else None
    not_found: list[str] = []
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, config.amqp.reconnect_window_seconds)
        try:
            with progress.bar("cancelling delayed messages", quiet=args.quiet) as bar:
                if args.all:
                    cancelled = await admin.cancel_every_delayed(db, target, bar)
                else:
                    cancelled, not_found = await admin.cancel_delayed_many(db, args.ids, bar)
        finally:
            await db.close()
    _report_cancelled(args.ids, cancelled, not_found)


def _report_cancelled(ids: list[str], cancelled: int, not_found: list[str]) -> None:
    if len(ids) == 1:
        if not_found:
            raise NothingToCancel(f"no pending delayed message {ids[0]}")
        logger.info("cancelled delayed message %s", ids[0])
        return
    for message_id in not_found:
        logger.warning("no pending delayed message %s", message_id)
    logger.info("cancelled %d delayed message(s)", cancelled)
    if not_found:
        raise NothingToCancel(f"{len(not_found)} of {len(ids)} ids named no pending message")


async def _release_delayed(config: Config, args: argparse.Namespace) -> None:
    message_id = None if args.all else validate.delivery_id(args.id)
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, config.amqp.reconnect_window_seconds)
        try:
            released = await delay.release(db, message_id)
        finally:
            await db.close()
    if message_id is not None and not released:
        raise NothingToRelease(f"no quarantined delayed message {message_id}")
    logger.info("released %d quarantined delayed message(s)", released)
