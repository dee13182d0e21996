"""Progress bars for long commands (requeue, cancel, purge, migrate): drawn on stderr when both
stdout and stderr are a terminal, and not at all with --quiet or in a script (either one piped
or redirected), where the command prints exactly what it prints without a bar."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


def add_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (none either when not on a terminal)"
    )


def on_terminal() -> bool:
    """Whether a person is watching: stdout and stderr both a terminal."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Bar:
    """One task's bar; a Bar made with no Progress draws nothing."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress = progress
        self._task = task

    @property
    def shown(self) -> bool:
        return self._progress is not None

    def __call__(self, done: int, total: int) -> None:
        """Where the work is: done of total (the admin jobs' Progress callback)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def describe(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def bar(description: str, *, quiet: bool, total: int | None = None) -> Iterator[Bar]:
    """A bar on stderr while the block runs (left on screen, complete, at its end); a Bar that
    draws nothing with quiet or off a terminal."""
    if quiet or not on_terminal():
        yield Bar()
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    with progress, _logs_above_bar():
        yield Bar(progress, progress.add_task(description, total=total))


@contextmanager
def _logs_above_bar() -> Iterator[None]:
    """While a bar is drawn, rich stands a proxy for sys.stderr that prints above the bar; log
    handlers opened on the real stderr are pointed at it, so their lines do not tear the bar."""
    proxy = sys.stderr
    if not isinstance(proxy, FileProxy):
        yield
        return
    moved = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is proxy.rich_proxied_file
    ]
    for handler in moved:
        handler.setStream(proxy)
    try:
        yield
    finally:
        for handler in moved:
            handler.setStream(proxy.rich_proxied_file)
