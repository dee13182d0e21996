"""A real `eventbus serve` process on free ports, as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.servers import free_port

if TYPE_CHECKING:
    from tests.conftest import Backends


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML for sections of strings, numbers and booleans; a value that is a dict becomes a
    table of its own under its quoted key: {"queues": {"orders.*": {...}}} gives
    [queues."orders.*"]."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        flat = {key: value for key, value in table.items() if not isinstance(value, dict)}
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in flat.items())
        for key, value in table.items():
            if isinstance(value, dict):
                lines.append(f"[{name}.{json.dumps(key)}]")
                lines.extend(f"{k} = {json.dumps(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def auth_table(mode: str, **identities: dict[str, Any]) -> dict[str, Any]:
    """An [auth] section for DaemonProcess, [auth.identities.NAME] as dotted keys (an _ in a
    keyword's NAME stands for -)."""
    table: dict[str, Any] = {"mode": mode}
    for name, keys in identities.items():
        for key, value in keys.items():
            table[f"identities.{name.replace('_', '-')}.{key}"] = value
    return table


class DaemonProcess:
    def __init__(
        self,
        directory: Path,
        backends: Backends,
        *,
        env: dict[str, str] | None = None,
        **overrides: dict[str, Any],
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        self.http_port = free_port()
        sections: dict[str, dict[str, Any]] = {
            "server": {
                "grpc_host": "127.0.0.1",
                "grpc_port": self.grpc_port,
                "http_host": "127.0.0.1",
                "http_port": self.http_port,
                "node_name": directory.name,
                "shutdown_grace_seconds": 5.0,
            },
            "amqp": {
                "url": backends.amqp_url,
                "namespace": backends.namespace,
                "reconnect_window_seconds": 10,
            },
            "postgres": {"dsn": backends.postgres_dsn},
            "redis": {"key_prefix": backends.redis_prefix},
            "log": {"level": "debug"},
        }
        for name, table in overrides.items():
            sections.setdefault(name, {}).update(table)
        self.config_path = directory / "config.toml"
        self.config_path.write_text(to_toml(sections))
        self.log_path = directory / "daemon.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in kill/stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "serve", "--config", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until /readyz says 200; fail with the daemon's log if it exits or never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log}")
            try:
                if self.http_get("/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.process.send_signal(sig)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log_file.close()
