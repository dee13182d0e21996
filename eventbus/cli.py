"""The eventbus command line: serve, migrate."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from . import __version__, aio, store
from .config import Config, ConfigError, load
from .daemon import Daemon
from .errors import FatalError

logger = logging.getLogger("eventbus")

EXIT_FATAL = 1
EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the command, and return the exit status."""
    args = _parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as error:
        print(f"eventbus: {error}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(config)
    status = 0
    try:
        trio.run(args.command, config)
    except* FatalError as group:
        for fatal in _leaves(group):
            logger.error("%s", fatal)
        status = EXIT_FATAL
    return status


def _leaves(group: BaseExceptionGroup[FatalError]) -> list[BaseException]:
    """Every exception inside a (possibly nested) exception group."""
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eventbus", description="A message bus daemon for microservices, over gRPC."
    )
    parser.add_argument("--version", action="version", version=f"eventbus {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for name, command, summary in [
        ("serve", _serve, "run the daemon until SIGTERM or SIGINT"),
        ("migrate", _migrate, "bring the PostgreSQL schema up to date, then exit"),
    ]:
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument(
            "--config",
            default="config.toml",
            metavar="FILE",
            help="the TOML configuration file (default: %(default)s)",
        )
        sub.set_defaults(command=command)
    return parser


async def _serve(config: Config) -> None:
    await Daemon(config).serve()


async def _migrate(config: Config) -> None:
    async with aio.open_loop(lambda: None):
        db = await store.open_store(config.postgres, window=config.amqp.reconnect_window_seconds)
        await db.close()
    logger.info("PostgreSQL schema is up to date")


def _configure_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=config.log.level.upper(), handlers=[handler], force=True)
    for noisy in ("aiormq", "aio_pika", "asyncio", "hypercorn.error", "redis"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # aiormq logs every failed connect as an ERROR; the broker supervisor already reports each
    # attempt in one warning line, and the final failure once.
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)
