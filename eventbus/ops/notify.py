"""systemd notifications (sd_notify): READY=1, RELOADING=1, STOPPING=1 and the watchdog
keep-alive."""

from __future__ import annotations

import logging
import os
import socket
import time

import trio

logger = logging.getLogger(__name__)


class Notifier:
    """Sends datagrams to $NOTIFY_SOCKET; does nothing when systemd did not set it."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ if environ is None else environ)
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, message: str) -> None:
        """Send one notification; a failure is logged, never raised (systemd may be gone)."""
        if not self._address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as error:
            logger.warning("sd_notify %r failed: %s", message, error)

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic clock's time, as Type=notify-reload (systemd 253)
        asks for it; READY=1 tells that the reload is over."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    async def keep_alive(self) -> None:
        """Send WATCHDOG=1 at half the watchdog interval, forever; returns at once without one."""
        if self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval / 2)


def _watchdog_interval(environ: dict[str, str]) -> float | None:
    """Seconds from WATCHDOG_USEC, when the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
