"""The admin page's browser sessions and the checks on every form it posts.

With auth on, a browser logs in once by posting an admin's bearer token to /ui/login; the node
keeps the token in memory under a random session id, which the browser holds in a cookie
(HttpOnly, SameSite=Strict, Path=/ui, Secure over HTTPS) for at most SESSION_SECONDS. Every
request authenticates that token again, so a reload that removes the identity, takes its admin
permission or changes its token ends the session at once; logging out, a restart or a
session pushed out of the table (at most MAX_SESSIONS, the least recently used first) ends it
too. With auth off there is no login: a session is opened by the first page with forms (a
queue's or a topic's), only to carry the form token; polls of the overview and error pages
open none.

Every form carries its session's CSRF token, and a POST is taken only from a page of this
origin (Origin header, else Referer). Every request must name, in its Host header, a name the
page is reached by (host_allowed): a page elsewhere that points its own name at this node (DNS
rebinding) is its own origin for the browser, and would pass the Origin check.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

COOKIE = "eventbus_ui"
SESSION_SECONDS = 8 * 3600
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str  # the form token of this session's pages
    token: str | None  # the bearer token it logged in with; None with auth off
    expires: float  # on the table's clock


class Sessions:
    """Sessions by id, the least recently used pushed out past a limit; looked up by the id's
    hash."""

    def __init__(
        self,
        limit: int = MAX_SESSIONS,
        lifetime: float = SESSION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def open(self, token: str | None) -> Session:
        session = Session(
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            token,
            self._clock() + self.lifetime,
        )
        self._sessions[_key(session.id)] = session
        while len(self._sessions) > self.limit:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of an id (from a cookie); None for an unknown or expired one."""
        if not session_id or len(session_id) > 100:
            return None
        key = _key(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[key]
            return None
        self._sessions.move_to_end(key)  # pushed out last: the table drops the least used
        return session

    def close(self, session_id: str) -> None:
        self._sessions.pop(_key(session_id), None)

    def __len__(self) -> int:
        return len(self._sessions)


def _key(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def cookie(session: Session | None, *, secure: bool, lifetime: float = SESSION_SECONDS) -> str:
    """The Set-Cookie value that hands a session to the browser (None: forget it)."""
    value, age = (session.id, int(lifetime)) if session is not None else ("", 0)
    attributes = f"{COOKIE}={value}; Path=/ui; Max-Age={age}; HttpOnly; SameSite=Strict"
    return attributes + ("; Secure" if secure else "")


LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")


def allowed_hosts(configured: Iterable[str]) -> frozenset[str]:
    """The names the page answers to: configured ones (server.http_host, [http] ui_hosts),
    localhost, the loopback addresses and the machine's host name, as host_name gives them."""
    names = [*configured, *LOCAL_NAMES, socket.gethostname()]
    return frozenset(host_name(_bracketed(name)) for name in names) - {""}


def host_name(host: str) -> str:
    """A Host header's name, without its port, lower case, a final dot dropped; an IPv6
    address in brackets. "" for a header that names no host."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1 :]
        return host[: end + 1] if end > 1 and (not rest or rest[0] == ":") else ""
    name, _, port = host.partition(":")
    if ":" in port:
        return ""
    return name.removesuffix(".")


def _bracketed(address: str) -> str:
    """An IPv6 address as a Host header names it."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def host_allowed(headers: Mapping[str, str], allowed: frozenset[str], local: str | None) -> bool:
    """Whether a request names a host the page answers to: one of allowed, or the address it
    reached this node at (local; an address, which no other site can point its name at)."""
    name = host_name(headers.get("host", ""))
    if not name:
        return False
    return name in allowed or (local is not None and name == host_name(_bracketed(local)))


def same_origin(headers: Mapping[str, str], scheme: str) -> bool:
    """Whether a POST comes from a page of the origin it is sent to: its Origin (else its
    Referer) names this scheme and host, and the browser does not call it cross-site."""
    host = headers.get("host", "")
    if headers.get("sec-fetch-site", "same-origin") != "same-origin":
        return False
    origin = headers.get("origin")
    if origin is None:
        referer = urlsplit(headers.get("referer", ""))
        origin = f"{referer.scheme}://{referer.netloc}" if referer.netloc else None
    return bool(host) and origin == f"{scheme}://{host}"


def csrf_valid(session: Session | None, sent: str | None) -> bool:
    """Whether a form's token is its session's."""
    if session is None or not sent:
        return False
    return hmac.compare_digest(session.csrf.encode(), sent.encode())
