"""Where a running daemon is and how to reach it (--server, TLS, a bearer token), the Python
client opened on it, and what a failed call means for the exit status.

Exit statuses of the commands that talk to a daemon:
  0  done
  1  the bus refused or failed the call (its gRPC status and message are printed)
  2  a bad command line, or an option's file that cannot be read
  3  the bus could not be reached (connection refused, TLS handshake failed, no answer in time)
  130  Ctrl-C
  141  standard output's reader went away (`eventbus pull ... | head -1`), as a shell reports a
       command that SIGPIPE ended; nothing is said on stderr about it
Anything else that goes wrong (a bug) is one line and status 1; its traceback is logged at
debug level (EVENTBUS_LOG_LEVEL=debug shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from grpclib.exceptions import GRPCError

from ..backends import aio
from ..client import Client, RpcError
from ..client.channel import parse_target
from . import output

DEFAULT_SERVER = "127.0.0.1:9091"
DEFAULT_TIMEOUT = 10.0
TOKEN_ENV = "EVENTBUS_TOKEN"
LOG_LEVEL_ENV = "EVENTBUS_LOG_LEVEL"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports `cat big | head -1`

logger = logging.getLogger(__name__)
T = TypeVar("T")
Command = Callable[["Remote", argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """An option that cannot be used (a file that cannot be read, a bad address): one line."""


class Unreachable(Exception):
    """The daemon's HTTP port did not answer (top's /stats and /readyz): one line."""


class Refused(Exception):
    """The daemon's HTTP port answered with an error status (401 without an admin token)."""


def add_options(parser: argparse.ArgumentParser) -> None:
    """--server, --timeout, the TLS options and the token options."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        metavar="HOST:PORT",
        help="the daemon's gRPC address (default: %(default)s; also unix:PATH)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="bound on each call (default: %(default)s)",
    )
    group.add_argument("--tls", action="store_true", help="use TLS (the system's CAs by default)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA certificates to verify the server")
    group.add_argument("--tls-cert", metavar="FILE", help="client certificate, for mTLS")
    group.add_argument("--tls-key", metavar="FILE", help="the client certificate's key")
    token = group.add_mutually_exclusive_group()
    token.add_argument("--token", help=f"bearer token (default: ${TOKEN_ENV})")
    token.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")


@dataclass(frozen=True)
class Remote:
    """A daemon to talk to: its gRPC address, TLS contexts (None: plaintext), token, timeout."""

    server: str
    grpc_tls: ssl.SSLContext | None
    http_tls: ssl.SSLContext | None
    token: str | None
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Remote:
        """The options checked and their files read; UsageError names the bad one."""
        try:
            parse_target(args.server)
        except ValueError as error:
            raise UsageError(f"--server: {error}") from None
        if args.timeout <= 0:
            raise UsageError("--timeout must be > 0")
        return cls(
            args.server,
            tls_context(args, alpn="h2"),
            tls_context(args, alpn="http/1.1"),
            read_token(args),
            args.timeout,
        )

    @property
    def authorization(self) -> dict[str, str]:
        """The header (and gRPC metadata) that carries the token, if there is one."""
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


def tls_context(args: argparse.Namespace, *, alpn: str) -> ssl.SSLContext | None:
    """A client context from --tls, --tls-ca, --tls-cert and --tls-key; None without them."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    try:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise UsageError(f"TLS files: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([alpn])
    return context


def read_token(args: argparse.Namespace) -> str | None:
    """--token, else the first line of --token-file, else $EVENTBUS_TOKEN, else None."""
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            text = Path(args.token_file).read_text().strip()
        except OSError as error:
            raise UsageError(f"--token-file {args.token_file}: {error.strerror}") from None
        if not text:
            raise UsageError(f"--token-file {args.token_file} is empty")
        return text.splitlines()[0]
    return os.environ.get(TOKEN_ENV) or None


# ---- The client (asyncio side) ---------------------------------------------------------------


def open_client(remote: Remote) -> Client:
    """(asyncio side) A client of the daemon whose calls carry the token."""
    return Client(remote.server, ssl=remote.grpc_tls, timeout=remote.timeout, token=remote.token)


# ---- Running a command and its exit status ---------------------------------------------------


def run(command: Command, args: argparse.Namespace) -> int:
    """Run a command against a daemon on a trio loop with the asyncio seam open; one line on
    stderr and the exit status when it fails."""
    logging.basicConfig(level=log_level(), format="eventbus: %(name)s: %(message)s")
    try:
        remote = Remote.from_args(args)
    except UsageError as error:
        return complain(str(error), EXIT_USAGE)
    status = EXIT_OK
    try:
        status = trio.run(_within_loop, command, remote, args)
    except* KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    except* (RpcError, Unreachable, Refused, UsageError) as group:
        failure = leaves(group)[0]
        status = complain(describe(failure, remote.server), exit_status(failure))
    except* BrokenPipeError:
        status = stdout_gone()
    except* Exception as group:
        logger.debug("unexpected failure", exc_info=group)
        failure = leaves(group)[0]
        unexpected = f"unexpected {type(failure).__name__}: {output.escape(failure)}"
        status = complain(unexpected, EXIT_REFUSED)
    return status


def log_level() -> int:
    """$EVENTBUS_LOG_LEVEL (debug, info, ...), warning without it or when it names no level."""
    named = os.environ.get(LOG_LEVEL_ENV, "").upper()
    return logging.getLevelNamesMapping().get(named, logging.WARNING)


def stdout_gone() -> int:
    """Standard output's reader went away: nothing more goes there (Python's flush of it at exit
    would fail again), and the status a shell gives a command that SIGPIPE ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE


async def _within_loop(command: Command, remote: Remote, args: argparse.Namespace) -> int:
    async with aio.open_loop(lambda: None):
        return await command(remote, args)


async def with_client(target: Remote, work: Callable[[Client], Awaitable[T]]) -> T:
    """(trio side) Run work(client) on the asyncio side with a client of the daemon, and close
    the client after it; waits on both."""

    async def session() -> T:
        client = open_client(target)
        try:
            return await work(client)
        finally:
            await client.aclose()

    return await aio.call(session)


def reached(error: RpcError) -> bool:
    """Whether the daemon itself answered with this error (a status it sent), rather than the
    call never reaching it or timing out on the way."""
    return isinstance(error.__cause__, GRPCError) or error.__cause__ is None


def exit_status(error: BaseException) -> int:
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if (isinstance(error, RpcError) and reached(error)) or isinstance(error, Refused):
        return EXIT_REFUSED
    return EXIT_UNREACHABLE


def describe(error: BaseException, server: str) -> str:
    """The one line a failure is reported with."""
    if isinstance(error, RpcError):
        if reached(error):
            return f"{error.status.name}: {error.details}"
        return f"cannot reach {server}: {error.details}"
    return str(error)


def complain(line: str, status: int) -> int:
    print(f"eventbus: {line}", file=sys.stderr)
    return status


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """Every exception inside a (possibly nested) exception group."""
    found: list[BaseException] = []
    for error in group.exceptions:
        found.extend(leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return found
