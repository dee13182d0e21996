"""`eventbus top`: a live view of a daemon's queues and health, refreshed every second until q
or Ctrl-C, like htop. Off a terminal (or with --once) it prints one screen and exits.

The first reading must succeed (else one line and the exit status of the failure); later ones
that fail show their error on the screen until the daemon answers again.
"""

from __future__ import annotations

import argparse
import signal
import sys
from datetime import datetime
from typing import Any

import trio
from rich.console import Console
from rich.live import Live

from ..backends import aio
from ..client import Client, RpcError
from . import keys, remote, sampling, view

NARROW_PIPE_WIDTH = 160  # columns of a screen printed off a terminal


def add_command(commands: Any) -> None:
    summary = "a live view of queues (counts, rates) and node health; q or Ctrl-C quits"
    sub: argparse.ArgumentParser = commands.add_parser("top", help=summary, description=summary)
    sub.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="the daemon's HTTP address, for its health, version, uptime and rates (/readyz, "
        "/stats); https:// when a TLS option is given, else http:// (or give the URL); the token "
        "goes over http:// only to this machine",
    )
    sub.add_argument(
        "--interval", type=float, default=1.0, metavar="SECONDS", help="refresh (default: 1)"
    )
    sub.add_argument(
        "--once", action="store_true", help="print one screen (rates over one interval), exit"
    )
    remote.add_options(sub)
    sub.set_defaults(remote=top, check=_check, parser=sub)


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 0.1 <= args.interval <= 3600:
        parser.error("--interval must be 0.1-3600 seconds")


class Sampler:
    """Readings of one daemon, over one client kept open between them."""

    def __init__(self, target: remote.Remote, client: Client, http: sampling.Http | None):
        self._target = target
        self._client = client
        self._http = http
        self._also: list[str] = []  # queues /stats counted last time

    @property
    def http_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    async def read(self, *, strict: bool = False) -> sampling.Reading:
        """Read /stats and /readyz (with --http), then the queues. strict: a failure raises
        (RpcError, remote.Unreachable, remote.Refused) instead of being noted in the reading."""
        stats = readiness = http_error = queues = queues_error = None
        if self._http is not None:
            try:
                stats, readiness = await self._http.read()
                self._also = sorted(stats.counters)
            except (remote.Unreachable, remote.Refused) as error:
                if strict:
                    raise
                http_error = str(error)
        try:
            queues = await aio.call(sampling.queue_counts, self._client, self._also)
        except RpcError as error:
            if strict:
                raise
            queues_error = remote.describe(error, self._target.server)
        return sampling.Reading(queues, queues_error, stats, readiness, http_error)


async def top(target: remote.Remote, args: argparse.Namespace) -> int:
    http = sampling.Http(args.http, target) if args.http else None
    client = await aio.call(_open, target)
    try:
        sampler = Sampler(target, client, http)
        first = await sampler.read(strict=True)
        if args.once or not sys.stdout.isatty():
            await _print_once(sampler, first, args)
        else:
            await _live(sampler, first, args)
    finally:
        await aio.call(client.aclose)
    return remote.EXIT_OK


async def _open(target: remote.Remote) -> Client:
    return remote.open_client(target)


def _frame(
    args: argparse.Namespace,
    sampler: Sampler,
    reading: sampling.Reading,
    before: sampling.Reading | None,
    height: int,
) -> view.Frame:
    previous = before.stats if before is not None else None
    return view.Frame(
        args.server,
        sampler.http_url,
        reading,
        sampling.rates(previous, reading.stats),
        datetime.now(),
        args.interval,
        height,
    )


async def _print_once(sampler: Sampler, first: sampling.Reading, args: argparse.Namespace) -> None:
    """One screen: a second reading an interval after the first, for the rates."""
    before, reading = first, first
    if args.http:
        await trio.sleep(args.interval)
        reading = await sampler.read(strict=True)
    console = Console(width=None if sys.stdout.isatty() else NARROW_PIPE_WIDTH)
    console.print(
        view.render(_frame(args, sampler, reading, before if args.http else None, 10_000))
    )


async def _live(sampler: Sampler, first: sampling.Reading, args: argparse.Namespace) -> None:
    """Redraw every interval until q, Ctrl-C or SIGTERM."""
    console = Console()
    with (
        keys.cbreak(sys.stdin) as keyboard,
        Live(console=console, screen=True, auto_refresh=False) as live,
    ):
        async with trio.open_nursery() as nursery:
            done = trio.Event()
            if keyboard is not None:
                nursery.start_soon(_until_q, keyboard, done)
            nursery.start_soon(_until_signal, done)
            nursery.start_soon(_redraw, live, sampler, first, args)
            await done.wait()
            nursery.cancel_scope.cancel()


async def _redraw(
    live: Live, sampler: Sampler, first: sampling.Reading, args: argparse.Namespace
) -> None:
    before: sampling.Reading | None = None
    reading = first
    next_at = trio.current_time()
    while True:
        frame = _frame(args, sampler, reading, before, live.console.size.height)
        live.update(view.render(frame), refresh=True)
        next_at += args.interval
        await trio.sleep_until(max(next_at, trio.current_time()))
        before, reading = reading, await sampler.read()
        if before.stats is None:  # the node was away: no rates across the gap
            before = None


async def _until_q(keyboard: int, done: trio.Event) -> None:
    while typed := await keys.keys(keyboard):
        if "q" in typed.lower():
            done.set()
            return


async def _until_signal(done: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            done.set()
            return
