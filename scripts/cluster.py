"""A whole eventbus cluster on this machine, beside the machine's own RabbitMQ and PostgreSQL:
three RabbitMQ nodes joined into one cluster, a PostgreSQL primary with a streaming standby,
and eventbus daemons using both (the machine's Redis, under a key prefix of their own).

Every process runs in a session of its own with its working directory under the cluster's base
directory, which holds all data, configuration and logs: `down` (or a failed start) finds and
ends whatever runs there, then removes the directory. Needs root (the servers run as the
rabbitmq and postgres users).

Usage:
    python scripts/cluster.py up [--base DIR] [--daemons N] [--queue-type quorum|classic]
    python scripts/cluster.py down [--base DIR]
    python scripts/cluster.py run [...]   # up, print how to connect, wait for Ctrl-C, down
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = Path("/tmp/eventbus-cluster")
RABBITMQ_HOME = Path("/var/lib/rabbitmq")  # its .erlang.cookie is the one rabbitmqctl uses
PG_BINS = glob.glob("/usr/lib/postgresql/*/bin")  # Debian's; the newest major version
PG_BIN = Path(max(PG_BINS, key=lambda p: float(Path(p).parent.name)) if PG_BINS else "/usr/bin")
REDIS_URL = "redis://127.0.0.1:6379/0"
GRACE = 10.0  # a graceful stop longer than this ends with SIGKILL
BOOT_TIMEOUT = 90.0
T = TypeVar("T")


class ClusterError(RuntimeError):
    """A part of the cluster failed to start."""


# -- processes ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """count distinct free TCP ports on 127.0.0.1 (held until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def as_user(name: str, *command: str) -> list[str]:
    """command run as a system user (we are root), through setpriv, which execs it: Popen's
    own user= would fork the calling process (with gRPC's fork handlers, should it use gRPC)
    instead of vfork-ing it."""
    return ["setpriv", f"--reuid={name}", f"--regid={name}", "--clear-groups", "--", *command]


def spawn(
    args: Sequence[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a process in a session of its own, output appended to log, working in cwd."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=env if env is not None else dict(os.environ),
            start_new_session=True,
        )


def run(args: Sequence[str], timeout: float = 60, **kw: Any) -> str:
    """Run a command to completion; its stdout, or ClusterError with its output."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if done.returncode != 0:
        raise ClusterError(
            f"{' '.join(args)}: exit {done.returncode}: {done.stderr or done.stdout}"
        )
    return str(done.stdout)


def signal_group(process: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Send sig to every process of the process's group (its session: see spawn)."""
    if process is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


def end_group(
    process: subprocess.Popen[bytes] | None, sig: int, grace: float = GRACE, pid: int | None = None
) -> None:
    """Send sig to pid (the process itself by default), SIGKILL its whole group after grace
    (or at once, should it be gone already, for what it left behind), and reap it."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid or process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    signal_group(process, signal.SIGKILL)
    process.wait(10)


def processes_under(base: Path) -> list[int]:
    """Pids of the processes working in base or below (every process of a cluster does)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == base or base in cwd.parents:
            found.append(int(entry.name))
    return found


def kill_under(base: Path, grace: float) -> None:
    """SIGTERM every process working under base, SIGKILL what is left after grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_under(base)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 10)
        while pids and processes_under(base) and time.monotonic() < deadline:
            time.sleep(0.1)


def tail(log: Path, lines: int = 5) -> str:
    """The last lines of a log (the directory goes with a failed start), for an error."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {log})"


def wait_until(what: str, check: Callable[[], bool], timeout: float, pause: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not within {timeout:g} s")
        time.sleep(pause)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def in_parallel(calls: Iterable[Callable[[], T]]) -> list[T]:
    """Run calls in threads; their results, or the first error once all are done."""
    calls = list(calls)
    if not calls:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        concurrent.futures.wait(futures)
    return [future.result() for future in futures]


def give_to(user: str, *paths: Path) -> None:
    for path in paths:
        shutil.chown(path, user, user)
        for inner in path.rglob("*") if path.is_dir() else ():
            shutil.chown(inner, user, user)


# -- RabbitMQ ----------------------------------------------------------------------------------


def rabbitmqctl(node: str, *args: str, timeout: float = 60) -> str:
    """rabbitmqctl against node (it runs as the rabbitmq user, with that user's cookie)."""
    return run(["rabbitmqctl", "-q", "-n", node, *args], timeout=timeout)


class RabbitNode:
    """One RabbitMQ node of the cluster, in a directory of its own."""

    def __init__(self, directory: Path, name: str, port: int, dist_port: int) -> None:
        self.directory = directory
        self.name = name
        self.port = port
        self.dist_port = dist_port
        self.url = f"amqp://guest:guest@127.0.0.1:{port}/"
        self.pid_file = directory / "rabbitmq.pid"
        self.log = directory / "log" / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def prepare(self) -> None:
        """Its directories, config file and enabled-plugins file, owned by rabbitmq."""
        for sub in ("mnesia", "log"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "log.console = false\nlog.file.level = info\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")  # no management plugin
        give_to("rabbitmq", self.directory)

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        return {
            **keep,
            "HOME": str(RABBITMQ_HOME),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
        }

    def launch(self) -> None:
        """Start the node's VM (without waiting for it)."""
        self.pid_file.unlink(missing_ok=True)
        self.process = spawn(
            as_user("rabbitmq", "/usr/lib/rabbitmq/bin/rabbitmq-server"),
            self.directory / "server.out",
            self.directory,
            self.env(),
        )

    def wait_booted(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the node's VM has written its pid file and started RabbitMQ."""
        wait_until(f"{self.name} pid file", self._pid_file_written, timeout)
        wait = ["wait", str(self.pid_file), "--timeout", str(int(timeout))]
        rabbitmqctl(self.name, *wait, timeout=timeout + 10)

    def _pid_file_written(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise ClusterError(f"{self.name} exited {code}: {tail(self.directory / 'server.out')}")
        return self.pid_file.exists()

    def join(self, seed: str) -> None:
        """Make this (fresh) node a member of seed's cluster."""
        rabbitmqctl(self.name, "stop_app")
        rabbitmqctl(self.name, "join_cluster", seed)
        rabbitmqctl(self.name, "start_app")

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """(Re)start the node and wait until it runs in the cluster again."""
        if self.running:
            return
        self.launch()
        self.wait_booted(timeout)
        wait_until(f"{self.name} listening", lambda: port_open(self.port), timeout)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM (and the rest of its process group)."""
        signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self, grace: float = GRACE) -> None:
        """Stop the node gracefully (SIGTERM to its VM, as systemd does), SIGKILL after grace."""
        try:
            vm = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            vm = None
        end_group(self.process, signal.SIGTERM, grace, pid=vm)

    @property
    def running(self) -> bool:
        """Its VM is alive and its AMQP port accepts connections."""
        return self.process is not None and self.process.poll() is None and port_open(self.port)

    def cluster_nodes(self) -> list[str]:
        """The running nodes of the cluster, as this node sees them."""
        out = rabbitmqctl(self.name, "cluster_status", "--formatter", "json")
        return list(json.loads(out).get("running_nodes", []))


# -- PostgreSQL --------------------------------------------------------------------------------


class PgNode:
    """A PostgreSQL server (primary or standby) in a data directory of its own."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.log = directory.parent / f"{directory.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pg(self, tool: str, *args: str, timeout: float = 60) -> str:
        """A PostgreSQL tool as the postgres user."""
        return run(as_user("postgres", str(PG_BIN / tool), *args), timeout, cwd="/")

    def sql(self, query: str, database: str = "postgres") -> str:
        connect = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database]
        return self.pg("psql", *connect, "-XAtqc", query, timeout=15).strip()

    def init_primary(self) -> None:
        """A fresh cluster with replication on (and synchronous, to the one standby when on)."""
        self.directory.mkdir(mode=0o700)
        give_to("postgres", self.directory)
        options = ["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]
        self.pg("initdb", "-D", str(self.directory), *options)
        with open(self.directory / "postgresql.conf", "a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                "wal_level = replica\nhot_standby = on\nmax_wal_senders = 5\n"
                "wal_keep_size = '256MB'\nfsync = off\nfull_page_writes = off\n"
                f"port = {self.port}\n"
            )

    def init_standby(self, primary: PgNode, synchronous: bool) -> None:
        """A base backup of primary that streams from it (pg_basebackup -R)."""
        self.directory.mkdir(mode=0o700)
        give_to("postgres", self.directory)
        source = ["-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"]
        target = ["-D", str(self.directory), "-R", "-X", "stream", "-c", "fast", "--no-sync"]
        self.pg("pg_basebackup", *source, *target)
        with open(self.directory / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nsynchronous_standby_names = ''\n")
        if synchronous:
            with open(primary.directory / "postgresql.conf", "a") as conf:
                conf.write("synchronous_standby_names = '*'\n")
            primary.sql("SELECT pg_reload_conf()")

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        if self.running:
            return
        (self.directory / "postmaster.pid").unlink(missing_ok=True)  # left by a SIGKILL
        command = as_user("postgres", str(PG_BIN / "postgres"), "-D", str(self.directory))
        self.process = spawn(command, self.log, self.directory)
        wait_until(f"PostgreSQL on {self.port}", self.accepts, timeout, pause=0.1)

    def accepts(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ClusterError(f"PostgreSQL on {self.port} exited: {tail(self.log)}")
        try:
            self.pg("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), timeout=5)
        except ClusterError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends: the machine is gone, as far as clients see."""
        signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self, grace: float = GRACE) -> None:
        """A fast shutdown (SIGINT), SIGKILL after grace."""
        end_group(self.process, signal.SIGINT, grace)

    def promote(self, timeout: float = 30) -> None:
        """Promote this standby (pg_ctl promote) and wait until it takes writes."""
        self.pg("pg_ctl", "promote", "-D", str(self.directory), "-w", "-t", str(int(timeout)))
        wait_until(f"PostgreSQL on {self.port} read-write", self.writable, timeout)

    def writable(self) -> bool:
        try:
            return self.sql("SELECT NOT pg_is_in_recovery()") == "t"
        except (ClusterError, subprocess.TimeoutExpired):
            return False

    def streaming_standbys(self) -> int:
        return int(self.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


# -- eventbus daemons --------------------------------------------------------------------------


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


class Daemon:
    """One `eventbus serve` of the cluster, on ports of its own."""

    def __init__(self, directory: Path, sections: dict[str, dict[str, Any]]) -> None:
        self.directory = directory
        self.grpc_port = int(sections["server"]["grpc_port"])
        self.http_port = int(sections["server"]["http_port"])
        self.config = directory / "config.toml"
        self.log = directory / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(to_toml(sections))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def launch(self) -> None:
        binary = ROOT / ".venv" / "bin" / "eventbus"
        command = [str(binary), "serve", "--config", str(self.config)]
        self.process = spawn(command, self.log, self.directory)

    def start(self, timeout: float = 60) -> None:
        """(Re)start with the same ports and config; wait until /readyz says 200."""
        if self.process is None or self.process.poll() is not None:
            self.launch()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(f"daemon {self.directory.name} /readyz", self.ready, timeout, pause=0.2)

    def ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ClusterError(f"daemon {self.directory.name} exited {code}: {tail(self.log)}")
        return self.http_get("/readyz")[0] == 200

    def http_get(self, path: str, timeout: float = 2) -> tuple[int, str]:
        """(status, body) of a page of its HTTP port; (0, reason) when it does not answer."""
        try:
            url = f"http://127.0.0.1:{self.http_port}{path}"
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:
            return 0, str(error)

    def kill(self) -> None:
        signal_group(self.process, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def terminate(self, grace: float = GRACE) -> int | None:
        """SIGTERM, wait (SIGKILL after grace); the exit status."""
        end_group(self.process, signal.SIGTERM, grace)
        return None if self.process is None else self.process.returncode

    def connected_broker(self, nodes: Sequence[RabbitNode] = ()) -> str | None:
        """The RabbitMQ node (name, or its URL without a known node) the daemon connected to
        last, from its log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        found = re.findall(r"RabbitMQ: (?:re)?connected to (\S+)", text)
        if not found:
            return None
        port = re.search(r":(\d+)/?", found[-1].split("@")[-1])
        for node in nodes:
            if port and int(port.group(1)) == node.port:
                return node.name
        return str(found[-1])


# -- the cluster -------------------------------------------------------------------------------


class Cluster:
    """Three RabbitMQ nodes, a PostgreSQL primary and standby, and `daemons` eventbus daemons,
    everything under base (see the module's docstring)."""

    def __init__(
        self,
        base: Path,
        *,
        daemons: int = 2,
        queue_type: str = "quorum",
        namespace: str = "event_bus",
        port_base: int | None = None,
        pg_synchronous: bool = True,
        overrides: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.base = Path(base).resolve()
        self.tag = uuid.uuid4().hex[:6]
        self.namespace = namespace
        self.queue_type = queue_type
        self.redis_url = REDIS_URL
        self.redis_prefix = f"eb_cluster_{self.tag}:"
        self.pg_synchronous = pg_synchronous
        self.overrides = overrides or {}  # daemon config keys by section, over the cluster's
        count = 3 * 2 + 2 + 2 * daemons
        ports = list(range(port_base, port_base + count)) if port_base else free_ports(count)
        names = [f"eb-{self.tag}-c{i}@localhost" for i in (1, 2, 3)]
        self.rabbits = [
            RabbitNode(self.base / f"rabbit{i + 1}", name, ports[2 * i], ports[2 * i + 1])
            for i, name in enumerate(names)
        ]
        self.amqp_urls = [node.url for node in self.rabbits]
        self.pg_primary = PgNode(self.base / "pg1", ports[6])
        self.pg_standby = PgNode(self.base / "pg2", ports[7])
        hosts = ",".join(node.address() for node in (self.pg_primary, self.pg_standby))
        self.postgres_dsn = (
            f"postgresql://postgres@{hosts}/eventbus?target_session_attrs=read-write"
        )
        self._daemon_ports = ports[8:]
        self.daemons: list[Daemon] = []
        self._count = daemons

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start everything and wait until each part works; on any failure stop what started
        (and remove base) before raising."""
        self._prepare_base()
        try:
            in_parallel([self._start_rabbits, self._start_postgres])
            self.daemons = [self._daemon(i) for i in range(self._count)]
            in_parallel([daemon.start for daemon in self.daemons])
        except BaseException:
            self.stop()
            raise

    def _prepare_base(self) -> None:
        if self.base.exists() and any(self.base.iterdir()):
            raise ClusterError(f"{self.base} is not empty: `cluster.py down --base {self.base}`")
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        for parent in self.base.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                raise ClusterError(f"{parent} is closed to other users (rabbitmq, postgres)")
        (self.base / "cluster.json").write_text(json.dumps(self.describe(), indent=2))

    def _start_rabbits(self) -> None:
        """Boot the three nodes at once, then join the second and third to the first."""
        for node in self.rabbits:
            node.prepare()
            node.launch()
        in_parallel([node.wait_booted for node in self.rabbits])
        seed = self.rabbits[0].name
        for node in self.rabbits[1:]:
            node.join(seed)
        running = self.rabbits[0].cluster_nodes()
        if sorted(running) != sorted(node.name for node in self.rabbits):
            raise ClusterError(f"RabbitMQ cluster incomplete: running {running}")

    def _start_postgres(self) -> None:
        """The primary with the eventbus database, then a standby streaming from it."""
        self.pg_primary.init_primary()
        self.pg_primary.start()
        self.pg_primary.sql("CREATE DATABASE eventbus")
        self.pg_standby.init_standby(self.pg_primary, self.pg_synchronous)
        self.pg_standby.start()
        wait_until("standby streaming", lambda: self.pg_primary.streaming_standbys() > 0, 30)

    def _daemon(self, index: int) -> Daemon:
        grpc_port, http_port = self._daemon_ports[2 * index : 2 * index + 2]
        server = {
            **{"grpc_host": "127.0.0.1", "grpc_port": grpc_port},
            **{"http_host": "127.0.0.1", "http_port": http_port},
            "node_name": f"cluster-{self.tag}-{index + 1}",
        }
        amqp = {"urls": self.amqp_urls, "queue_type": self.queue_type, "namespace": self.namespace}
        sections: dict[str, dict[str, Any]] = {
            "server": server,
            "amqp": amqp,
            "postgres": {"dsn": self.postgres_dsn},
            "redis": {"url": self.redis_url, "key_prefix": self.redis_prefix},
        }
        for name, table in self.overrides.items():
            sections[name] = {**sections.get(name, {}), **table}
        return Daemon(self.base / f"daemon{index + 1}", sections)

    def stop(self) -> None:
        """End every process (daemons first; SIGKILL after a grace), then remove base and the
        daemons' Redis keys."""
        in_parallel([partial(d.terminate, GRACE) for d in self.daemons])
        parts: list[RabbitNode | PgNode] = [*self.rabbits, self.pg_primary, self.pg_standby]
        in_parallel([partial(p.stop, GRACE) for p in parts])
        if self.base.exists():
            kill_under(self.base, grace=2)
            shutil.rmtree(self.base, ignore_errors=True)
        delete_redis_keys(self.redis_url, self.redis_prefix)

    def describe(self) -> dict[str, Any]:
        """Where everything is, as cluster.json and `run` tell it."""
        return {
            "base": str(self.base),
            "rabbitmq": [{"name": n.name, "port": n.port, "url": n.url} for n in self.rabbits],
            "postgres": {
                "primary": self.pg_primary.port,
                "standby": self.pg_standby.port,
                "dsn": self.postgres_dsn,
            },
            "redis": {"url": self.redis_url, "key_prefix": self.redis_prefix},
            "daemons": [
                {"grpc": d.grpc_address, "http": f"127.0.0.1:{d.http_port}", "log": str(d.log)}
                for d in self.daemons
            ],
        }


def delete_redis_keys(url: str, prefix: str) -> None:
    """Remove the cluster's keys from the shared Redis (best effort)."""
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as error:  # the cluster is down either way
        print(f"cluster: Redis keys {prefix}* not removed: {error}", file=sys.stderr)


def down(base: Path) -> None:
    """End whatever a cluster runs under base, then remove base (and its Redis keys)."""
    base = base.resolve()
    state = base / "cluster.json"
    prefix = json.loads(state.read_text())["redis"]["key_prefix"] if state.exists() else None
    kill_under(base, GRACE)
    shutil.rmtree(base, ignore_errors=True)
    if prefix:
        delete_redis_keys(REDIS_URL, prefix)


# -- command line ------------------------------------------------------------------------------


def usage(cluster: Cluster) -> str:
    """How to reach the cluster, to print."""
    first = cluster.daemons[0] if cluster.daemons else None
    grpc = first.grpc_address if first else "127.0.0.1:PORT"
    lines = ["eventbus cluster up:"]
    lines += [f"  RabbitMQ   {n.name}  {n.url}" for n in cluster.rabbits]
    primary, standby = cluster.pg_primary.port, cluster.pg_standby.port
    lines.append(f"  PostgreSQL primary 127.0.0.1:{primary}, standby 127.0.0.1:{standby}")
    lines.append(f"             {cluster.postgres_dsn}")
    lines.append(f"  Redis      {cluster.redis_url} (key prefix {cluster.redis_prefix})")
    for d in cluster.daemons:
        lines.append(
            f"  daemon     grpc {d.grpc_address}  http 127.0.0.1:{d.http_port}  log {d.log}"
        )
    lines += [
        "",
        "Try it:",
        f'  grpcurl -plaintext -d \'{{"queue":"demo","data":"hello"}}\' {grpc} mq.Mq/publish',
        f'  grpcurl -plaintext -d \'{{"queue":"demo"}}\' {grpc} mq.Mq/subscribe',
        "  .venv/bin/python - <<'EOF'",
        "import asyncio",
        "from eventbus.client import Client",
        "async def main():",
        f'    async with Client("{grpc}") as client:',
        '        await client.v1.publish("demo", "hello")',
        '        message = await client.v1.subscribe("demo")',
        "        print(message)",
        "        await client.v1.ack(message.id)",
        "asyncio.run(main())",
        "EOF",
        f"  rabbitmqctl -n {cluster.rabbits[0].name} cluster_status",
        f"  psql -h 127.0.0.1 -p {cluster.pg_primary.port} -U postgres eventbus",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=("up", "down", "run"))
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--daemons", type=int, default=2)
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    args = parser.parse_args(argv)
    if args.command == "down":
        down(args.base)
        return 0
    cluster = Cluster(args.base, daemons=args.daemons, queue_type=args.queue_type)
    started = time.monotonic()
    cluster.start()
    (cluster.base / "cluster.json").write_text(json.dumps(cluster.describe(), indent=2))
    print(usage(cluster))
    print(f"(started in {time.monotonic() - started:.1f} s)")
    if args.command == "up":
        print(f"stop it with: .venv/bin/python scripts/cluster.py down --base {cluster.base}")
        return 0
    return serve_until_signal(cluster)


def serve_until_signal(cluster: Cluster) -> int:
    """Wait for Ctrl-C or SIGTERM, then take the cluster down."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print("Ctrl-C stops the cluster.", flush=True)
    while not stop:
        time.sleep(0.2)
    started = time.monotonic()
    cluster.stop()
    print(f"cluster down ({time.monotonic() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
