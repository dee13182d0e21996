"""The eventbus command as a user runs it: in a subprocess with its output piped, or on a real
terminal inside a tmux server of the test's own (its own socket, killed at the end); and a daemon
kept for a whole test module, on backends of its own."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from eventbus.client import Client
from tests import servers
from tests.conftest import Backends
from tests.daemon_process import DaemonProcess

T = TypeVar("T")
EVENTBUS = [sys.executable, "-m", "eventbus"]
ROOT = Path(__file__).resolve().parent.parent


def eventbus(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `eventbus ARGS` with stdout and stderr piped (not a terminal)."""
    return subprocess.run(
        [*EVENTBUS, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def with_client(address: str, scenario: Callable[[Client], Awaitable[T]], **options: Any) -> T:
    """Run a scenario with the Python client on a plain asyncio loop."""

    async def main() -> T:
        async with Client(address, timeout=10, **options) as client:
            return await asyncio.wait_for(scenario(client), 60)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def wait_until(check: Callable[[], T], timeout: float = 20, what: str = "the condition") -> T:
    """Poll check() until it returns something true; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s (last: {value!r})")
        time.sleep(0.2)


@contextmanager
def module_daemon(
    amqp_url: str, directory: Path, *, ready: bool = True, **overrides: Any
) -> Iterator[DaemonProcess]:
    """A daemon on a database and Redis prefix of its own (the run's vhost, a namespace of its
    own), removed afterwards; waited for unless ready is False (its HTTP speaks TLS, say)."""
    database = servers.unique_name("eventbus_test")
    dsn = servers.create_database(database)
    prefix = servers.unique_name("eventbus_test") + ":"
    backends = Backends(amqp_url, dsn, prefix, servers.unique_name("ns"))
    daemon = DaemonProcess(directory, backends, **overrides)
    try:
        if ready:
            daemon.wait_ready()
        yield daemon
    finally:
        daemon.kill()
        servers.drop_database(database)
        servers.delete_redis_keys(prefix)


class Tmux:
    """A tmux server of this test's own, with one window running one command on a real
    terminal of the given size; the command's exit status is printed after it as EXIT=N."""

    def __init__(self, width: int = 160, height: int = 40) -> None:
        self.socket = f"eventbus_test_{uuid.uuid4().hex[:10]}"
        self.width, self.height = width, height

    def _tmux(self, *args: str) -> str:
        command = ["tmux", "-L", self.socket, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    def run(self, args: list[str], env: dict[str, str] | None = None) -> None:
        """Start `eventbus ARGS` in the window (in the project's directory)."""
        settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        line = f"{settings} {shlex.join([*EVENTBUS, *args])}; echo EXIT=$?; sleep 3600"
        size = ["-x", str(self.width), "-y", str(self.height)]
        self._tmux("new-session", "-d", *size, "-c", str(ROOT), line)

    def screen(self) -> str:
        """What the terminal shows now."""
        return self._tmux("capture-pane", "-p")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """The screen once it shows text."""

        def shown() -> str:
            screen = self.screen()
            return screen if text in screen else ""

        return wait_until(shown, timeout, f"a screen with {text!r}")

    def exit_status(self, timeout: float = 30) -> int:
        """The command's exit status, once it has ended."""
        screen = self.wait_for("EXIT=", timeout)
        return int(screen.split("EXIT=")[1].split()[0])

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@contextmanager
def tmux(width: int = 160, height: int = 40) -> Iterator[Tmux]:
    terminal = Tmux(width, height)
    try:
        yield terminal
    finally:
        terminal.close()
