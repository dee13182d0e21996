"""What `eventbus top` reads from a daemon each second, and the rates between two readings.

Queue counts (ready, in flight, delayed, dead letters, consumers) come from the gRPC Admin
service; the node's counters, version and uptime from HTTP /stats and its dependencies from
/readyz (both only with --http). Rates are the differences of /stats counters over the
difference of the node's uptime between two readings: the node's own clock, so the time a
request spent on the way does not count.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from grpclib.const import Status

from ..client import Client, RpcError
from ..jobs.admin import QueueInfo
from ..ops.metrics import OTHER_QUEUES
from . import output, queues, remote

RATES = {"publish": "published", "deliver": "delivered", "ack": "acked"}  # column: counter
DEPENDENCIES = ("rabbitmq", "postgresql", "redis", "grpc")
MAX_LOOKUPS = 100  # queues known only from /stats looked up one by one per reading

QueueCounts = QueueInfo  # a queue's counts, as the Admin service gives them


@dataclass(frozen=True)
class NodeStats:
    """One /stats document, the parts top shows."""

    node: str
    version: str
    uptime: float
    counters: Mapping[str, Mapping[str, int]]  # queue: counter: value
    peers: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> NodeStats:
        peers = document.get("nodes")
        return cls(
            str(document.get("node", "")),
            str(document.get("version", "")),
            float(document.get("uptime_seconds", 0.0)),
            {
                str(queue): {str(k): int(v) for k, v in values.items()}
                for queue, values in dict(document.get("queues") or {}).items()
            },
            tuple(str(p.get("name")) for p in peers) if isinstance(peers, list) else (),
        )


@dataclass(frozen=True)
class Readiness:
    """/readyz: ready or not, and the reason of each part down or degraded."""

    ready: bool
    down: Mapping[str, str] = field(default_factory=dict)
    degraded: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reading:
    """What one refresh got; each part None with its error when it could not be had."""

    queues: list[QueueCounts] | None = None
    queues_error: str | None = None
    stats: NodeStats | None = None
    readiness: Readiness | None = None
    http_error: str | None = None


Rates = dict[str, dict[str, float]]  # queue: column (publish, deliver, ack): per second


def rates(before: NodeStats | None, after: NodeStats | None) -> Rates | None:
    """Per-second rates between two readings of one node; None across a restart (its uptime
    went back) or a different node, and none for a counter that went back. A queue without
    counters had no traffic through the node."""
    if before is None or after is None or before.node != after.node:
        return None
    elapsed = after.uptime - before.uptime
    if elapsed <= 0:
        return None
    found: Rates = {}
    for queue, counters in after.counters.items():
        earlier = before.counters.get(queue, {})
        for column, counter in RATES.items():
            delta = counters.get(counter, 0) - earlier.get(counter, 0)
            if delta >= 0:
                found.setdefault(queue, {})[column] = delta / elapsed
    return found


# ---- HTTP -----------------------------------------------------------------------------------


def base_url(address: str, *, tls: bool = False) -> str:
    """http://HOST:PORT for HOST:PORT (https:// with tls: any TLS option given); a URL
    (http://HOST:PORT, https://HOST:PORT) as given."""
    if "://" in address:
        return address.rstrip("/")
    return f"{'https' if tls else 'http'}://{address}"


def on_this_machine(url: str) -> bool:
    """Whether the URL's host is localhost or a loopback address (not looked up)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Http:
    """The daemon's HTTP port: /stats (with the token) and /readyz, read in a worker thread."""

    def __init__(self, address: str, target: remote.Remote) -> None:
        """UsageError when a token would go over plain HTTP to another machine."""
        self.url = base_url(address, tls=target.http_tls is not None)
        if target.token and self.url.startswith("http://") and not on_this_machine(self.url):
            raise remote.UsageError(
                f"--http {self.url}: the token would cross the network in plain text; "
                "give https://HOST:PORT"
            )
        self._headers = target.authorization
        self._tls = target.http_tls
        self._timeout = target.timeout

    async def read(self) -> tuple[NodeStats, Readiness]:
        """Both pages; Unreachable (no answer, or not the daemon's) or Refused (an error
        status) with one line when either cannot be had. Waits on worker threads, left behind
        when cancelled (q does not wait for --timeout on a port that never answers)."""
        stats = await trio.to_thread.run_sync(self._get, "/stats", abandon_on_cancel=True)
        ready = await trio.to_thread.run_sync(self._get, "/readyz", abandon_on_cancel=True)
        try:
            readiness = Readiness(
                bool(ready.get("ready")),
                dict(ready.get("down") or {}),
                dict(ready.get("degraded") or {}),
            )
            return NodeStats.from_json(stats), readiness
        except (TypeError, ValueError, AttributeError) as error:
            wrong = f"{self.url}: not the daemon's /stats or /readyz ({error})"
            raise remote.Unreachable(wrong) from None

    def _get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._tls) as reply:
                return _document(reply)
        except urllib.error.HTTPError as error:
            if path == "/readyz" and error.code == 503:  # not ready: the body says why
                return self._not_ready(error)
            refused = f"{self.url}{path}: HTTP {error.code} {error.reason}"
            raise remote.Refused(refused) from None
        except (OSError, ValueError, ssl.SSLError, http.client.HTTPException) as error:
            raise self._unreachable(path, _reason(error)) from None

    def _not_ready(self, error: urllib.error.HTTPError) -> dict[str, Any]:
        """/readyz's 503 body: why the node is not ready."""
        try:
            return _document(error)
        except (OSError, ValueError, http.client.HTTPException) as failure:
            why = f"HTTP 503 without the daemon's JSON ({_reason(failure)})"
            raise self._unreachable("/readyz", why) from None

    def _unreachable(self, path: str, reason: str) -> remote.Unreachable:
        return remote.Unreachable(f"cannot read {self.url}{path}: {reason}")


def _reason(error: Exception) -> str:
    """Why a page could not be read, in one printable line."""
    if isinstance(error, http.client.RemoteDisconnected):
        return str(error)
    if isinstance(error, http.client.BadStatusLine):  # its text is what came: any bytes
        return "not an HTTP/1.1 reply (is it the gRPC port?)"
    return output.escape(getattr(error, "reason", None) or error) or type(error).__name__


def _document(reply: Any) -> dict[str, Any]:
    """A reply's JSON object; ValueError when it holds none."""
    document = json.load(reply)
    if not isinstance(document, dict):
        raise ValueError(f"not a JSON object: {type(document).__name__}")
    return document


# ---- gRPC -----------------------------------------------------------------------------------


async def queue_counts(client: Client, also: list[str]) -> list[QueueCounts]:
    """(asyncio side) Every queue ListQueues knows, and those of `also` it does not (looked up
    one by one, at most MAX_LOOKUPS; one that no longer exists is left out)."""
    listed = [_counts(info) for info in await queues.queue_infos(client)]
    known = {counts.name for counts in listed}
    for name in [n for n in also if n not in known and n != OTHER_QUEUES][:MAX_LOOKUPS]:
        try:
            [info] = await queues.queue_infos(client, [name])
        except RpcError as error:
            if error.status not in (Status.NOT_FOUND, Status.INVALID_ARGUMENT):
                raise
        else:
            listed.append(_counts(info))
    return sorted(listed, key=lambda counts: counts.name)


def _counts(info: Any) -> QueueCounts:
    return QueueCounts(
        info.name, info.ready, info.in_flight, info.delayed, info.dead_letters, info.consumers
    )
