"""The admin page at /ui: the rate history and the page's pure parts alone, then real HTTP
requests against real daemons: off by default, security headers, sessions and login, CSRF and
Origin checks, escaping of what clients sent, the same numbers as /stats and Admin.GetQueue,
and actions logged as admin actions."""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlencode

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventbus.backends.store import Store
from eventbus.delivery.envelope import DelayedMessage
from eventbus.jobs import delay
from eventbus.ops.history import TOTAL, History
from eventbus.ui import listings, markup
from eventbus.ui.routes import MAX_OFFSET, offset
from eventbus.ui.sessions import (
    Sessions,
    allowed_hosts,
    cookie,
    csrf_valid,
    host_allowed,
    host_name,
    same_origin,
)
from eventbus.ui.views import cut_short
from tests import servers
from tests.bus_client import BusClient
from tests.daemon_process import DaemonProcess
from tests.test_admin import AdminClient

T = TypeVar("T")

ADMIN_TOKEN = "ui-admin-token-for-tests"
READER_TOKEN = "ui-reader-token-for-tests"
# A nack or a missed deadline makes a dead letter at the next tick, five ticks a second.
FAST: dict[str, dict[str, Any]] = {
    "delivery": {"max_retries": 0, "nack_redelivery_delay_seconds": 0},
    "cron": {"interval_seconds": 0.2},
    "http": {"ui_enabled": True},
}
RUN = uuid.uuid4().hex[:6]  # queue names of this run's own: the RabbitMQ vhost is shared
HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>\"'&"


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def with_auth(**sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """FAST with token auth: an admin "ops" and a "reader" that may only subscribe."""
    auth = {
        "mode": "token",
        "identities.ops.token_sha256": sha256(ADMIN_TOKEN),
        "identities.ops.admin": True,
        "identities.ops.publish": ["*"],
        "identities.ops.subscribe": ["*"],
        "identities.reader.token_sha256": sha256(READER_TOKEN),
        "identities.reader.subscribe": ["*"],
    }
    return {**FAST, "auth": auth, **sections}


def eventually(probe: Callable[[], T], wanted: Callable[[T], bool], timeout: float = 15) -> T:
    deadline = time.monotonic() + timeout
    while not wanted(value := probe()):
        assert time.monotonic() < deadline, f"still {value!r}"
        time.sleep(0.1)
    return value


# ---- The rate history ----------------------------------------------------------------------


def readings(**queues: tuple[float, float, float]) -> dict[str, dict[str, float]]:
    """{series: {queue: value}} from queue=(published, delivered, acked)."""
    return {
        name: {queue: values[i] for queue, values in queues.items()}
        for i, name in enumerate(("published", "delivered", "acked"))
    }


def test_rates_are_counter_deltas_per_second_oldest_first() -> None:
    history = History(keep=4, every=10)
    history.sample(readings(orders=(0, 0, 0)), now=0)
    history.sample(readings(orders=(100, 50, 20)), now=10)
    history.sample(readings(orders=(100, 80, 40)), now=20)
    rates = history.rates("orders")
    assert rates is not None
    assert math.isnan(rates.series["published"][0])  # never sampled
    assert rates.series["published"][-2:] == [10.0, 0.0]
    assert rates.series["delivered"][-2:] == [5.0, 3.0]
    assert rates.latest("acked") == 2.0
    totals = history.rates(TOTAL)
    assert totals is not None and totals.latest("delivered") == 3.0


def test_the_window_keeps_only_the_last_samples() -> None:
    history = History(keep=3, every=1)
    for second in range(10):
        history.sample(readings(q=(second * second, 0, 0)), now=second)
    rates = history.rates("q")
    assert rates is not None
    assert rates.series["published"] == [13.0, 15.0, 17.0]  # 7²-6², 8²-7², 9²-8²


def test_queues_tracked_are_capped_and_idle_ones_make_room() -> None:
    history = History(max_queues=2, keep=3, every=1)
    history.sample(readings(a=(0, 0, 0), b=(0, 0, 0)), now=0)
    history.sample(readings(a=(1, 0, 0), b=(0, 0, 0), c=(5, 0, 0)), now=1)
    assert history.tracked() == ["a", "b"] and history.untracked == 1
    totals = history.rates(TOTAL)
    assert totals is not None and totals.latest("published") == 6.0  # c counts in the totals
    for second in range(2, 6):  # b stays idle for the whole window; a keeps moving
        history.sample(readings(a=(second, 0, 0), b=(0, 0, 0), c=(5, 0, 0)), now=second)
    assert history.tracked() == ["a", "c"] and history.untracked == 1  # b now
    assert history.rates("b") is None


def test_a_queue_that_stops_being_reported_reads_as_idle_not_as_its_old_rates() -> None:
    history = History(keep=3, every=1)
    history.sample(readings(q=(0, 0, 0)), now=0)
    history.sample(readings(q=(9, 0, 0)), now=1)
    for second in (2, 3, 4):
        history.sample(readings(), now=second)
    rates = history.rates("q")
    assert rates is not None and rates.series["published"] == [0.0, 0.0, 0.0]


# ---- Markup, sessions, form checks ---------------------------------------------------------


def test_every_value_is_escaped_unless_it_is_html_already() -> None:
    page = markup.fill("<td title='{a}'>{b}</td>", a=HOSTILE, b=markup.Html("<b>ok</b>"))
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&#x27;" in page and "<b>ok</b>" in page
    assert "<script>" not in markup.Html("<p>") + HOSTILE  # adding escapes what is added
    assert markup.join(["<i>", markup.Html("<i>")]) == "&lt;i&gt;<i>"


def test_body_previews_are_cut_and_binary_bodies_shown_as_bytes() -> None:
    assert markup.preview(b"short\n\n  body") == "short body"
    long = markup.preview(("x" * 500).encode())
    assert long.startswith("x" * 120 + "…") and "500 bytes" in long and len(long) < 140
    assert markup.preview(b"\xff\xfe\x00") == "(binary, 3 bytes) ff fe 00"


def test_a_preview_of_a_body_s_start_gives_the_whole_body_s_size() -> None:
    head = ("é" * 600).encode()[:1023]  # cut inside a character
    shown = markup.preview(head, 6_000_000)
    assert shown == "é" * 120 + "… (6,000,000 bytes)"
    assert markup.preview(b"short", 5_000) == "short… (5,000 bytes)"
    assert markup.preview(b"\xff" * 1024, 70_000).startswith("(binary, 70,000 bytes) ff ff")


def test_sparkline_paths_leave_gaps_where_nothing_was_sampled() -> None:
    drawn = markup.path([math.nan, 0.0, 2.0, math.nan, 1.0], top=2.0, width=40, height=10)
    assert drawn == "M10.0 9.0L20.0 1.0M40.0 5.0"


def test_sessions_expire_are_bounded_and_looked_up_only_by_their_id() -> None:
    now = [0.0]
    sessions = Sessions(limit=2, lifetime=100, clock=lambda: now[0])
    first = sessions.open("token-1")
    assert sessions.get(first.id) == first and sessions.get(first.csrf) is None
    second, third = sessions.open(None), sessions.open(None)
    assert sessions.get(first.id) is None and len(sessions) == 2  # the least used pushed out
    now[0] = 100
    assert sessions.get(second.id) is None and sessions.get(third.id) is None
    assert not csrf_valid(second, "") and not csrf_valid(None, "x")
    assert csrf_valid(second, second.csrf) and not csrf_valid(second, third.csrf)


def test_a_session_in_use_is_not_the_one_pushed_out() -> None:
    sessions = Sessions(limit=2)
    operator = sessions.open(None)
    poller = sessions.open(None)
    assert sessions.get(operator.id) == operator  # the operator's page, used again
    sessions.open(None)  # a third browser
    assert sessions.get(operator.id) == operator and sessions.get(poller.id) is None


def test_the_session_cookie_is_httponly_strict_and_secure_over_https() -> None:
    session = Sessions().open(None)
    plain = cookie(session, secure=False)
    assert f"eventbus_ui={session.id};" in plain
    assert "HttpOnly" in plain and "SameSite=Strict" in plain and "Path=/ui" in plain
    assert "Secure" not in plain and "Secure" in cookie(session, secure=True)
    assert "Max-Age=0" in cookie(None, secure=False)


@pytest.mark.parametrize(
    ("headers", "ok"),
    [
        ({"host": "h:1", "origin": "http://h:1"}, True),
        ({"host": "h:1", "referer": "http://h:1/ui/queue?name=a"}, True),
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "same-origin"}, True),
        ({"host": "h:1", "origin": "http://evil:1"}, False),
        ({"host": "h:1", "origin": "https://h:1"}, False),
        ({"host": "h:1", "origin": "null"}, False),
        ({"host": "h:1"}, False),
        ({"host": "h:1", "origin": "http://h:1", "sec-fetch-site": "cross-site"}, False),
        ({"host": "h:1", "referer": "http://evil/x"}, False),
    ],
)
def test_forms_are_taken_only_from_this_origin(headers: dict[str, str], ok: bool) -> None:
    assert same_origin(headers, "http") is ok


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("127.0.0.1:7878", "127.0.0.1"),
        ("LocalHost.", "localhost"),
        ("[::1]:7878", "[::1]"),
        ("[::1]", "[::1]"),
        ("bus1.example.com", "bus1.example.com"),
        ("", ""),
        ("::1", ""),
        ("[]:1", ""),
        ("[::1]x", ""),
        ("a:1:2", ""),
    ],
)
def test_host_headers_read_as_names_without_their_port(host: str, name: str) -> None:
    assert host_name(host) == name


def test_the_page_answers_only_to_its_own_host_names() -> None:
    allowed = allowed_hosts(["10.1.2.3", "bus1.example.com", "fd00::7"])
    for host in ("localhost:7878", "127.0.0.1:1", "[::1]:7878", "10.1.2.3", "BUS1.example.com"):
        assert host_allowed({"host": host}, allowed, None), host
    assert host_allowed({"host": "[fd00::7]:7878"}, allowed, None)
    assert host_allowed({"host": f"{socket.gethostname()}:7878"}, allowed, None)
    # A name an attacker points at this node (DNS rebinding), or no name at all.
    for headers in ({"host": "rebind.example:7878"}, {"host": "localhost.evil"}, {}):
        assert not host_allowed(headers, allowed, None), headers
    # The address a request reached the node at (bound to 0.0.0.0: any of its addresses) is no
    # name anyone else controls.
    assert host_allowed({"host": "192.168.5.5:7878"}, allowed, "192.168.5.5")
    assert host_allowed({"host": "[fe80::5]:7878"}, allowed, "fe80::5")
    assert not host_allowed({"host": "rebind.example"}, allowed, "192.168.5.5")


def test_listing_offsets_from_the_url_are_ascii_numbers_within_bounds() -> None:
    assert offset("50") == 50 and offset(None) == 0 and offset("") == 0
    assert offset("²") == 0 and offset("٣") == 0 and offset("-5") == 0 and offset("1e3") == 0
    assert offset("9" * 5000) == MAX_OFFSET == 1_000_000
    assert offset("1000001") == MAX_OFFSET


def test_an_overview_cut_at_the_listing_limit_says_so() -> None:
    assert cut_short(999, 1000) == []
    [notice] = cut_short(1000, 1000)
    assert "only the first 1,000 queues" in notice


async def test_page_listings_read_the_start_of_each_body_and_its_size(postgres_dsn: str) -> None:
    big = b"x" * (3 * 1024 * 1024)

    async def work(store: Store) -> None:
        await store.execute(
            "INSERT INTO dead_letters (queue, message_id, body, attempts, last_delivery_id, "
            "last_failure_at, dead_at) VALUES ('orders', $1, $2, 4, $1, now(), now()), "
            "('orders', $3, 'small', 1, $3, now(), now() + interval '1 second')",
            uuid.uuid4(),
            big,
            uuid.uuid4(),
        )
        later = time.time() + 3600
        pending = [
            DelayedMessage(str(uuid.uuid4()), "queue", "orders", big, later, 0),
            DelayedMessage(str(uuid.uuid4()), "topic", "orders", b"elsewhere", later, 0),
        ]
        await delay.write(store, pending)
        letters = await listings.dead_letters(store, "orders", 51, 0)
        assert [(len(d.head), d.size, d.attempts) for d in letters] == [
            (listings.HEAD_BYTES, len(big), 4),
            (5, 5, 1),
        ]
        assert letters[0].head == big[: listings.HEAD_BYTES] and letters[1].head == b"small"
        assert await listings.dead_letters(store, "orders", 51, 1) == letters[1:]
        [row] = await listings.delayed(store, ("queue", "orders"), 51, 0)
        assert (row.id, len(row.head), row.size) == (pending[0].id, listings.HEAD_BYTES, len(big))
        [row] = await listings.delayed(store, ("topic", "orders"), 51, 0)
        assert (row.head, row.size) == (b"elsewhere", 9)

    await servers.with_store(postgres_dsn, work)


# ---- Real HTTP against a daemon ------------------------------------------------------------


class Browserless:
    """HTTP/1.1 requests to a daemon's HTTP port, redirects not followed, cookies kept."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.host = f"127.0.0.1:{daemon.http_port}"
        self.cookies: dict[str, str] = {}

    def request(
        self,
        method: str,
        path: str,
        form: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        *,
        origin: str | None = "same",
    ) -> tuple[int, http.client.HTTPMessage, str]:
        sent = dict(headers or {})
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urlencode(form, doseq=True)
            sent["Content-Type"] = "application/x-www-form-urlencoded"
            if origin is not None:
                sent["Origin"] = f"http://{self.host}" if origin == "same" else origin
        connection = http.client.HTTPConnection(self.host, timeout=15)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";")[0]
            if not self.cookies[name]:
                del self.cookies[name]
        return response.status, response.headers, text

    def get(self, path: str, **headers: str) -> tuple[int, http.client.HTTPMessage, str]:
        return self.request("GET", path, headers=headers)

    def json(self, path: str, **headers: str) -> Any:
        status, _, text = self.get(path, **headers)
        assert status == 200, text
        return json.loads(text)

    def csrf(self, path: str) -> str:
        """The form token on a page with a form (with auth off, the overview has none)."""
        status, _, text = self.get(path)
        assert status == 200, text
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        assert found, "no form token on the page"
        return found.group(1)


@pytest.fixture
def ui_bus(make_daemon: Any) -> Iterator[tuple[DaemonProcess, BusClient, AdminClient]]:
    daemon = make_daemon(**FAST)
    daemon.wait_ready()
    client, admin = BusClient(daemon.grpc_address), AdminClient(daemon.grpc_address)
    yield daemon, client, admin
    client.close()
    admin.channel.close()


def dead_letter(client: BusClient, queue: str, data: str) -> None:
    client.publish(queue, data)
    client.nack(client.subscribe(queue).id)  # max_retries = 0: dead at the next tick


def test_the_page_is_off_unless_enabled(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.wait_ready()
    for path in ("/ui", "/ui/api/overview", "/ui/login", "/ui/static/ui.js"):
        assert daemon.http_get(path)[0] == 404


def test_every_answer_carries_the_security_headers(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, _ = ui_bus
    queue = f"headers-{RUN}"
    client.publish(queue, "one")
    web = Browserless(daemon)
    for path in ("/ui", "/ui/api/overview", f"/ui/queue?name={queue}", "/ui/static/ui.css"):
        status, headers, _ = web.get(path)
        assert status == 200, path
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "default-src 'none'" in policy
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
    status, headers, text = web.get("/ui")
    assert "<script>" not in text and " style=" not in text and "onclick" not in text
    assert headers["Cache-Control"] == "no-store"
    web.cookies.clear()
    status, headers, _ = web.get(f"/ui/queue?name={queue}")
    [set_cookie] = headers.get_all("Set-Cookie")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/ui" in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP here
    assert web.request("GET", "/ui/queue/purge")[0] == 405  # actions are POST only


def test_what_clients_sent_is_escaped_and_bodies_cut(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, admin = ui_bus
    queue = f"hostile-{RUN}"
    dead_letter(client, queue, HOSTILE + "y" * 1000)
    client.delay_publish(queue, HOSTILE, delay=600)
    eventually(lambda: counts(admin, queue)[2:4], lambda c: c == (1, 1))
    web = Browserless(daemon)
    status, _, text = web.get(f"/ui/queue?name={queue}")
    assert status == 200
    assert "<script>alert" not in text and "<img src=x" not in text
    assert text.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 2
    assert "y" * 200 not in text and "bytes)" in text  # cut, with the body's size
    status, _, text = web.get("/ui/queue?name=" + "%3Cscript%3Ealert(1)%3C/script%3E")
    assert status == 400 and "<script>alert(1)" not in text and "&lt;script&gt;" in text
    status, _, text = web.get("/ui/topic?name=%3Cb%3E")
    assert status == 400 and "<b>" not in text
    status, _, text = web.get(f"/ui/queue?name={queue}&done=purged&n=%3Cb%3E&kept=%3Ci%3E")
    assert status == 200 and "<b>" not in text and "<i>" not in text and "purged" not in text


def counts(admin: AdminClient, queue: str) -> tuple[int, int, int, int, int]:
    info = admin.queue(queue)
    return info.ready, info.in_flight, info.delayed, info.dead_letters, info.consumers


def test_posts_need_the_form_token_and_this_origin(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, admin = ui_bus
    queue = f"purgeable-{RUN}"
    for data in ("a", "b", "c"):
        client.publish(queue, data)
    web = Browserless(daemon)
    token = web.csrf(f"/ui/queue?name={queue}")
    form = {"queue": queue, "confirm": queue}
    assert web.request("POST", "/ui/queue/purge", form)[0] == 403  # no form token
    assert web.request("POST", "/ui/queue/purge", {**form, "csrf": "made-up"})[0] == 403
    signed = {**form, "csrf": token}
    assert web.request("POST", "/ui/queue/purge", signed, origin="http://evil.example")[0] == 403
    assert web.request("POST", "/ui/queue/purge", signed, origin=None)[0] == 403
    cross = {"Sec-Fetch-Site": "cross-site"}
    assert web.request("POST", "/ui/queue/purge", signed, cross)[0] == 403
    stranger = Browserless(daemon)  # its own session: another session's token is not its
    stranger.csrf(f"/ui/queue?name={queue}")
    assert stranger.request("POST", "/ui/queue/purge", signed)[0] == 403
    assert admin.queue(queue).ready == 3  # nothing was done
    status, _, text = web.request("POST", "/ui/queue/purge", {"queue": queue, "csrf": token})
    assert status == 200 and "Type the queue name" in text and "Purge 3 ready messages" in text
    assert admin.queue(queue).ready == 3  # asked to confirm first
    status, headers, _ = web.request("POST", "/ui/queue/purge", signed)
    assert status == 303 and headers["Location"] == f"/ui/queue?name={queue}&done=purged&n=3#purge"
    assert admin.queue(queue).ready == 0
    assert "3 ready messages purged." in web.get(headers["Location"].split("#")[0])[2]
    line = eventually(lambda: audit_line(daemon, "ui/PurgeQueue"), lambda line: line is not None)
    assert "admin: a caller (auth off) from 127.0.0.1:" in str(line) and f"on {queue}" in str(line)
    assert admin_actions(daemon, "ui/PurgeQueue") == 1


def admin_actions(daemon: DaemonProcess, method: str) -> float:
    """eventbus_admin_actions_total of method, every identity together."""
    total = 0.0
    for family in text_string_to_metric_families(daemon.http_get("/metrics")[1]):
        for sample in family.samples:
            if sample.name == "eventbus_admin_actions_total" and sample.labels["method"] == method:
                total += sample.value
    return total


def audit_line(daemon: DaemonProcess, method: str) -> str | None:
    found = [
        line for line in daemon.log.splitlines() if "eventbus.audit" in line and method in line
    ]
    return found[-1] if found else None


def test_dead_letters_requeued_and_deleted_and_delayed_cancelled_through_forms(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, admin = ui_bus
    queue = f"mail-{RUN}"
    for data in ("first", "second", "third"):
        dead_letter(client, queue, data)
    client.delay_publish(queue, "later", delay=600)
    eventually(lambda: counts(admin, queue)[2:4], lambda c: c == (1, 3))
    web = Browserless(daemon)
    token = web.csrf(f"/ui/queue?name={queue}")
    page = web.get(f"/ui/queue?name={queue}")[2]
    row = r'<code>([^<]*)</code></td><td class="row-actions"><button type="submit" name="requeue" '
    letters = dict(re.findall(row + r'value="([0-9a-f-]{36})"', page))
    [delayed_id] = re.findall(r'name="cancel" value="([0-9a-f-]{36})"', page)
    assert letters.keys() == {"first", "second", "third"}
    form = {"csrf": token, "queue": queue, "requeue": letters["first"]}
    status, headers, _ = web.request("POST", "/ui/dead-letters", form)
    assert status == 303 and "done=requeued&n=1&kept=0" in headers["Location"]
    assert client.subscribe(queue).data == "first"  # delivered again
    ids = [letters["second"], letters["third"]]
    form = {"csrf": token, "queue": queue, "delete": "selected", "ids": ids}
    status, headers, _ = web.request("POST", "/ui/dead-letters", form)
    assert status == 303 and "done=deleted&n=2" in headers["Location"]
    form = {"csrf": token, "kind": "queue", "name": queue, "cancel": delayed_id}
    status, headers, _ = web.request("POST", "/ui/delayed/cancel", form)
    assert status == 303 and headers["Location"].endswith("done=cancelled&n=1#delayed")
    assert counts(admin, queue)[2:4] == (0, 0)
    form = {"csrf": token, "queue": queue, "delete": "selected"}  # nothing ticked
    status, _, text = web.request("POST", "/ui/dead-letters", form)
    assert status == 400 and "select at least one message" in text
    for method in ("ui/RequeueDeadLetters", "ui/DeleteDeadLetters", "ui/CancelDelayed"):
        assert eventually(lambda m=method: audit_line(daemon, m), lambda x: x is not None)


def test_the_page_shows_what_stats_and_admin_show(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, admin = ui_bus
    orders, payments = f"stats-orders-{RUN}", f"stats-payments-{RUN}"
    for index in range(5):
        client.publish(orders, f"order {index}")
    for _ in range(2):
        client.ack(client.subscribe(orders).id)
    held = client.subscribe(orders)  # in flight
    dead_letter(client, payments, "declined")
    client.delay_publish(orders, "tomorrow", delay=3600)
    web = Browserless(daemon)

    def settled() -> bool:
        stats = json.loads(daemon.http_get("/stats")[1])["queues"]
        acked = stats.get(orders, {}).get("acked")
        return acked == 2 and stats.get(payments, {}).get("dead_letters") == 1

    eventually(settled, bool)
    overview = web.json("/ui/api/overview")
    stats = json.loads(daemon.http_get("/stats")[1])
    rows = {row["name"]: row for row in overview["queues"]}
    assert {orders, payments} <= rows.keys()
    for name, row in rows.items():
        assert row["counters"] == stats["queues"].get(name, {}), name
        info = admin.queue(name)
        shown = tuple(
            row[k] for k in ("ready", "in_flight", "delayed", "dead_letters", "consumers")
        )
        assert shown == (
            info.ready,
            info.in_flight,
            info.delayed,
            info.dead_letters,
            info.consumers,
        )
        if name in stats["queues"] and "dead_letters" in stats["queues"][name]:
            assert row["dead_letters"] == stats["queues"][name]["dead_letters"]
    assert rows[orders]["in_flight"] == 1 and rows[orders]["ready"] == 2
    assert rows[orders]["delayed"] == 1 and rows[payments]["dead_letters"] == 1
    assert rows[orders]["oldest_unacked_seconds"] >= 0
    assert rows[payments]["oldest_unacked_seconds"] is None
    [this] = [node for node in overview["nodes"] if node["this"]]
    assert this["name"] == stats["node"] and this["version"] == stats["version"]
    assert this["dependencies"] == dict.fromkeys(("rabbitmq", "postgresql", "redis", "grpc"), "up")
    totals = overview["totals"]
    assert totals["ready"] == sum(row["ready"] for row in rows.values())
    assert totals["dead_letters"] == sum(row["dead_letters"] for row in rows.values())
    front = web.get("/ui")[2]
    assert "counts: the bus's, over the queues listed · rates: this node's" in front
    assert "Publish, this node" in front and "on this node</span></h2>" not in front
    page = web.get(f"/ui/queue?name={orders}")[2]
    assert "On this node since it started: published 5 · delivered 3 · acked 2" in page
    assert "[delivery] (no [queues] glob matches)" in page
    client.ack(held.id)


def test_a_queue_page_names_the_retry_policy_that_matches(make_daemon: Any) -> None:
    policies = {
        "orders.*": {"max_retries": 7, "backoff_min_seconds": 2, "backoff_max_seconds": 60},
        "*": {"max_retries": 1},
    }
    daemon = make_daemon(**FAST, queues=policies)
    daemon.wait_ready()
    client = BusClient(daemon.grpc_address)
    client.publish(f"orders.eu-{RUN}", "x")
    client.close()
    text = Browserless(daemon).get(f"/ui/queue?name=orders.eu-{RUN}")[2]
    assert "[queues.&quot;orders.*&quot;]" in text and "7 (then a dead letter)" in text
    assert "2 s doubling per attempt up to 60 s" in text
    assert Browserless(daemon).get("/ui/queue?name=no-such-queue")[0] == 404


def test_with_auth_on_only_an_admin_gets_in(make_daemon: Any) -> None:
    daemon = make_daemon(**with_auth())
    daemon.wait_ready()
    web = Browserless(daemon)
    status, headers, _ = web.get("/ui")
    assert status == 303 and headers["Location"] == "/ui/login"
    assert web.get("/ui/queue?name=x")[0] == 303
    assert web.get("/ui/api/overview")[0] == 401
    assert web.get("/ui/api/overview", Authorization=f"Bearer {READER_TOKEN}")[0] == 403
    assert web.get("/ui/api/overview", Authorization=f"Bearer {ADMIN_TOKEN}")[0] == 200
    assert not web.cookies  # nothing handed out before a login
    status, _, text = web.request("POST", "/ui/queue/purge", {"queue": "x", "confirm": "x"})
    assert status == 303  # to the login form: no session
    status, _, text = web.request("POST", "/ui/login", {"token": "wrong"})
    assert status == 401 and "Unknown token." in text and not web.cookies
    status, _, text = web.request("POST", "/ui/login", {"token": READER_TOKEN})
    assert status == 403 and "Not an admin identity." in text and not web.cookies
    status, _, _ = web.request("POST", "/ui/login", {"token": ADMIN_TOKEN}, origin="http://evil")
    assert status == 403 and not web.cookies
    status, headers, _ = web.request("POST", "/ui/login", {"token": ADMIN_TOKEN})
    assert status == 303 and headers["Location"] == "/ui" and "eventbus_ui" in web.cookies
    status, _, page = web.get("/ui")
    assert status == 200 and "Log out" in page and ADMIN_TOKEN not in page
    assert web.get("/ui/api/overview")[0] == 200
    line = eventually(lambda: audit_line(daemon, "logged in"), lambda x: x is not None)
    assert "identity ops from 127.0.0.1" in str(line)
    session = web.cookies["eventbus_ui"]
    status, _, _ = web.request("POST", "/ui/logout", {"csrf": web.csrf("/ui")})
    assert status == 303 and "eventbus_ui" not in web.cookies
    web.cookies["eventbus_ui"] = session  # the old cookie, kept by a thief
    assert web.get("/ui")[0] == 303 and web.get("/ui/api/overview")[0] == 401


def test_a_reload_that_takes_admin_away_ends_the_session(make_daemon: Any) -> None:
    daemon = make_daemon(**with_auth())
    daemon.wait_ready()
    web = Browserless(daemon)
    assert web.request("POST", "/ui/login", {"token": ADMIN_TOKEN})[0] == 303
    assert web.get("/ui")[0] == 200
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(re.sub(r"identities\.ops\.admin = true\n", "", text))
    assert "identities.ops.admin" not in daemon.config_path.read_text()
    daemon.process.send_signal(signal.SIGHUP)
    eventually(lambda: web.get("/ui")[0], lambda status: status == 303)


def test_moments_ages_and_rates_read_well() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert markup.moment(now + timedelta(seconds=75), now) == "2025-01-02 03:05:20 UTC (in 1m 15s)"
    assert markup.age(3 * 86400 + 7200) == "3d 2h" and markup.age(None) == "—"
    assert markup.rate(0.5) == "0.5/s" and markup.rate(0) == "0/s"
    assert markup.rate(1234.4) == "1,234/s" and markup.rate(math.nan) == "—"


def audit_lines(daemon: DaemonProcess, text: str) -> int:
    return sum(1 for line in daemon.log.splitlines() if "eventbus.audit" in line and text in line)


def test_a_host_name_the_page_is_not_reached_by_is_refused(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    """DNS rebinding: a site points its own name at this node; the browser then takes the
    node's pages for that site's own, Origin and all."""
    daemon, client, admin = ui_bus
    queue = f"rebound-{RUN}"
    client.publish(queue, "kept")
    web = Browserless(daemon)
    evil = f"rebind.example:{daemon.http_port}"
    own = {"Host": evil}
    for path in ("/ui", "/ui/api/overview", f"/ui/queue?name={queue}", "/ui/static/ui.js"):
        status, headers, text = web.request("GET", path, headers=own)
        assert status == 421, path
        assert headers["Content-Type"].startswith("text/plain") and "ui_hosts" in text
        assert "Set-Cookie" not in headers and not web.cookies
    form = {"queue": queue, "confirm": queue}
    status, _, _ = web.request("POST", "/ui/queue/purge", form, own, origin=f"http://{evil}")
    assert status == 421 and admin.queue(queue).ready == 1
    for host in ("localhost", "127.0.0.1", socket.gethostname()):
        status, _, text = web.request("GET", "/ui", headers={"Host": f"{host}:{daemon.http_port}"})
        assert status == 200 and "Overview" in text, host
    assert daemon.http_get("/stats")[0] == 200  # the rest of the port is not the page's


def test_each_action_and_login_is_logged_however_often(make_daemon: Any) -> None:
    daemon = make_daemon(**with_auth())
    daemon.wait_ready()
    queue = f"twice-{RUN}"
    web = Browserless(daemon)
    for _ in range(2):
        assert web.request("POST", "/ui/login", {"token": ADMIN_TOKEN})[0] == 303
    eventually(lambda: audit_lines(daemon, "logged in"), lambda n: n == 2)
    token = web.csrf("/ui")
    for _ in range(2):
        form = {"csrf": token, "queue": queue, "confirm": queue}
        assert web.request("POST", "/ui/queue/purge", form)[0] == 404  # logged as it is tried
    eventually(lambda: audit_lines(daemon, f"ui/PurgeQueue on {queue}"), lambda n: n == 2)


def test_only_a_page_with_forms_opens_a_session(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, _ = ui_bus
    queue = f"sessions-{RUN}"
    client.publish(queue, "one")
    web = Browserless(daemon)
    for path in ("/ui", "/ui/api/overview", "/ui/queue?name=no-such-queue", "/ui/static/ui.css"):
        status, headers, _ = web.get(path)
        assert status in (200, 404) and "Set-Cookie" not in headers, path
    status, headers, _ = web.get(f"/ui/queue?name={queue}")
    assert status == 200 and "eventbus_ui" in web.cookies
    held = web.cookies["eventbus_ui"]
    status, headers, _ = web.get(f"/ui/queue?name={queue}")
    assert "Set-Cookie" not in headers and web.cookies["eventbus_ui"] == held  # kept


def test_odd_listing_offsets_read_as_the_first_page(
    ui_bus: tuple[DaemonProcess, BusClient, AdminClient],
) -> None:
    daemon, client, _ = ui_bus
    queue = f"offsets-{RUN}"
    client.publish(queue, "one")
    web = Browserless(daemon)
    for value in ("%C2%B2", "%D9%A3", "99999999999999999999999"):  # ², Arabic-Indic 3, huge
        status, _, text = web.get(f"/ui/queue?name={queue}&dead={value}&delayed={value}")
        assert status == 200, (value, text[:200])
    status, _, _ = web.get("/ui/topic?name=some.topic&delayed=%C2%B2")
    assert status == 200
    assert "Traceback" not in daemon.log


def test_names_in_ui_hosts_reach_the_page(make_daemon: Any) -> None:
    daemon = make_daemon(**{**FAST, "http": {**FAST["http"], "ui_hosts": ["bus1.example"]}})
    daemon.wait_ready()
    web = Browserless(daemon)
    named = {"Host": f"bus1.example:{daemon.http_port}"}
    status, _, text = web.request("GET", "/ui", headers=named)
    assert status == 200 and "Overview" in text
    status, _, _ = web.request("GET", "/ui", headers={"Host": f"bus2.example:{daemon.http_port}"})
    assert status == 421
