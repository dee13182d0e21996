"""The admin page in a real browser: headless Chromium (Debian's chromium and chromium-driver,
`make browser`) driven by selenium against a real daemon with real traffic. Browser and gRPC
calls block, so they run in worker threads of the trio test."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
import pytest
import trio
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.bus_client import BusClient
from tests.daemon_process import DaemonProcess
from tests.test_admin import AdminClient
from tests.test_ui import ADMIN_TOKEN, FAST, RUN, with_auth

T = TypeVar("T")
WAIT_SECONDS = 15

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="chromium and chromedriver are not installed (make browser)",
)


def open_browser(width: int = 1360, height: int = 900, extra: Sequence[str] = ()) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
        *extra,
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    driver = open_browser()
    yield driver
    driver.quit()


async def blocking(call: Callable[..., T], *args: Any) -> T:
    """A blocking call (selenium, grpcio) in a worker thread."""
    return await trio.to_thread.run_sync(call, *args)


async def until(probe: Callable[[], T], wanted: Callable[[T], bool]) -> T:
    """probe()'s first value wanted accepts, asked every 0.2 s in a worker thread, for at
    most WAIT_SECONDS."""
    with trio.fail_after(WAIT_SECONDS):
        while True:
            value = await blocking(probe)
            if wanted(value):
                return value
            await trio.sleep(0.2)


def text_of(driver: WebDriver, css: str) -> str:
    """The text of the first element css finds; "" while there is none (or the page is being
    replaced)."""
    try:
        found = driver.find_elements(By.CSS_SELECTOR, css)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


async def at(driver: WebDriver, url: str) -> None:
    """Wait until the browser shows url (a click's navigation may still be under way)."""
    await until(lambda: driver.current_url, lambda current: current == url)


def row_cells(driver: WebDriver, queue: str) -> list[str]:
    """The cells of a queue's overview row; [] while there is none (or the live refresh is
    replacing it)."""
    try:
        rows = driver.find_elements(By.CSS_SELECTOR, f'#queues tbody tr[data-name="{queue}"]')
        return (
            [cell.text for cell in rows[0].find_elements(By.CSS_SELECTOR, "th, td")] if rows else []
        )
    except StaleElementReferenceException:
        return []


def log_in(driver: WebDriver, daemon: DaemonProcess, token: str = ADMIN_TOKEN) -> None:
    driver.get(f"http://127.0.0.1:{daemon.http_port}/ui")
    assert driver.current_url.endswith("/ui/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()


class Bearer(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends an identity's token with every unary call."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = (*(details.metadata or ()), *self.metadata)
        return continuation(details._replace(metadata=metadata), request)


def started(make_daemon: Any, **sections: Any) -> tuple[DaemonProcess, BusClient, AdminClient]:
    """A daemon and its clients, which bring the admin's token when auth is on."""
    daemon = make_daemon(**sections)
    daemon.wait_ready()
    client, admin = BusClient(daemon.grpc_address), AdminClient(daemon.grpc_address)
    if "auth" in sections:
        client.channel = grpc.intercept_channel(client.channel, Bearer(ADMIN_TOKEN))
        admin.channel = grpc.intercept_channel(admin.channel, Bearer(ADMIN_TOKEN))
    return daemon, client, admin


async def test_the_overview_shows_each_queue_live_and_sorts_and_fits_a_phone(
    make_daemon: Any, browser: WebDriver, tmp_path: Path
) -> None:
    daemon, client, admin = await blocking(lambda: started(make_daemon, **with_auth()))
    orders, payments = f"orders-{RUN}", f"payments-{RUN}"
    for data in ("o1", "o2", "o3"):
        await blocking(client.publish, orders, data)
    await blocking(client.delay_publish, orders, "later", 600)
    await blocking(client.publish, payments, "card declined")
    delivery = await blocking(client.subscribe, payments)
    await blocking(client.nack, delivery.id)  # a dead letter at the next tick
    await until(lambda: admin.queue(payments).dead_letters, lambda n: n == 1)
    await until(lambda: admin.queue(orders).delayed, lambda n: n == 1)

    await blocking(log_in, browser, daemon)
    await at(browser, f"http://127.0.0.1:{daemon.http_port}/ui")
    # Queue, ready, in flight, delayed, dead letters, consumers as Admin.GetQueue says.
    assert (await blocking(row_cells, browser, orders))[:6] == [orders, "3", "0", "1", "0", "0"]
    cells = await blocking(row_cells, browser, payments)
    assert cells[4] == "1"  # its dead letter
    info = await blocking(admin.queue, payments)
    assert cells[:6] == [payments, *map(str, (info.ready, 0, 0, 1, info.consumers))]

    # Live: more traffic shows up without reloading the page.
    await blocking(browser.execute_script, "window.sameDocument = true")
    for data in ("o4", "o5"):
        await blocking(client.publish, orders, data)
    await until(lambda: row_cells(browser, orders)[1:2], lambda cells: cells == ["5"])
    assert await blocking(browser.execute_script, "return window.sameDocument === true")
    assert await blocking(text_of, browser, "#refreshed") != "Refreshed live."

    # Sorting by a column, most first.
    await blocking(
        lambda: browser.find_element(By.CSS_SELECTOR, 'a[data-key="dead_letters"]').click()
    )
    first = await blocking(text_of, browser, "#queues tbody tr th")
    assert first == payments and "sort=dead_letters&order=desc" in browser.current_url
    await blocking(lambda: browser.find_element(By.CSS_SELECTOR, 'a[data-key="ready"]').click())
    assert await blocking(text_of, browser, "#queues tbody tr th") == orders
    await blocking(browser.save_screenshot, str(tmp_path / "overview.png"))

    # The queue page, by its link.
    await blocking(lambda: browser.find_element(By.LINK_TEXT, orders).click())
    await until(lambda: text_of(browser, "h1"), lambda text: text == orders)
    tiles = await blocking(text_of, browser, ".tiles")
    assert "Ready\n5" in tiles and "Delayed\n1" in tiles
    assert "[delivery] (no [queues] glob matches)" in await blocking(text_of, browser, ".policy")

    # A phone: nothing wider than the screen but the tables, which scroll in their boxes.
    await blocking(browser.set_window_size, 390, 844)
    await blocking(browser.get, f"http://127.0.0.1:{daemon.http_port}/ui")
    overflow = "return document.documentElement.scrollWidth - window.innerWidth"
    assert await blocking(browser.execute_script, overflow) <= 0
    await blocking(client.close)


async def test_requeue_cancel_and_purge_act_on_the_bus(
    make_daemon: Any, browser: WebDriver
) -> None:
    daemon, client, admin = await blocking(lambda: started(make_daemon, **FAST))
    mail, bulk = f"mail-{RUN}", f"bulk-{RUN}"
    await blocking(client.publish, mail, "hello again")
    await blocking(client.nack, (await blocking(client.subscribe, mail)).id)
    await blocking(client.delay_publish, mail, "never", 6)
    for index in range(4):
        await blocking(client.publish, bulk, f"b{index}")
    await until(lambda: admin.queue(mail).dead_letters, lambda n: n == 1)
    await until(lambda: admin.queue(mail).delayed, lambda n: n == 1)
    page = f"http://127.0.0.1:{daemon.http_port}/ui/queue?name="

    await blocking(browser.get, page + mail)
    dead = await blocking(text_of, browser, "#dead-letters")
    assert "hello again" in dead and "retries used up" in dead
    cancel = '#delayed button[name="cancel"]:not([value="selected"])'
    await blocking(lambda: browser.find_element(By.CSS_SELECTOR, cancel).click())
    await until(
        lambda: text_of(browser, ".notice"), lambda text: text == "1 delayed messages cancelled."
    )
    assert await blocking(text_of, browser, "#delayed") == "Delayed messages 0\nNone."

    requeue = '#dead-letters button[name="requeue"]:not([value="selected"]):not([value="all"])'
    await blocking(lambda: browser.find_element(By.CSS_SELECTOR, requeue).click())
    await until(
        lambda: text_of(browser, ".notice"), lambda text: text == "1 dead letters requeued."
    )
    again = await blocking(client.subscribe, mail)
    assert again.data == "hello again"  # delivered again, through the bus
    await blocking(client.ack, again.id)
    # The cancelled delayed message was due 6 s after it was sent: it never comes.
    assert await blocking(client.try_subscribe, mail, 8) is None

    await blocking(browser.get, page + bulk)
    await blocking(lambda: browser.find_element(By.ID, "purge-button").click())
    await until(
        lambda: text_of(browser, "h1"), lambda text: text == f"Purge 4 ready messages of {bulk}?"
    )
    assert (await blocking(admin.queue, bulk)).ready == 4  # not before it is confirmed
    await blocking(lambda: browser.find_element(By.ID, "confirm").send_keys(bulk))
    await blocking(lambda: browser.find_element(By.ID, "confirm-button").click())
    await until(
        lambda: text_of(browser, ".notice"), lambda text: text == "4 ready messages purged."
    )
    assert (await blocking(admin.queue, bulk)).ready == 0
    await blocking(client.close)


async def test_refused_without_the_token_and_without_the_form_token(
    make_daemon: Any, browser: WebDriver
) -> None:
    daemon, client, admin = await blocking(lambda: started(make_daemon, **with_auth()))
    kept = f"kept-{RUN}"
    for data in ("k1", "k2"):
        await blocking(client.publish, kept, data)
    base = f"http://127.0.0.1:{daemon.http_port}"

    await blocking(browser.get, base + f"/ui/queue?name={kept}")
    assert browser.current_url == base + "/ui/login"
    await blocking(log_in, browser, daemon, "not-a-token")
    await until(lambda: text_of(browser, ".notice"), lambda text: text == "Unknown token.")
    assert not await blocking(browser.get_cookies)

    await blocking(log_in, browser, daemon)
    await at(browser, base + "/ui")
    [session] = await blocking(browser.get_cookies)
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/ui"
    # The session's cookie goes with a script's POST, but the form token does not.
    forged = (
        "const done = arguments[arguments.length - 1];"
        "fetch('/ui/queue/purge', {method: 'POST', body: 'queue=KEPT&confirm=KEPT',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}})"
        ".then(r => done(r.status));"
    ).replace("KEPT", kept)
    assert await blocking(browser.execute_async_script, forged) == 403
    # A form on another site: the SameSite=Strict cookie stays home, so it is not logged in.
    form = (
        f"<form method=post action='{base}/ui/queue/purge'><input name=queue value={kept}>"
        f"<input name=confirm value={kept}></form>"
    )
    await blocking(browser.get, "data:text/html," + quote(form))
    await blocking(browser.execute_script, "document.forms[0].submit()")
    await at(browser, base + "/ui/login")
    assert (await blocking(admin.queue, kept)).ready == 2  # nothing was purged

    await blocking(browser.get, base + "/ui")
    await blocking(lambda: browser.find_element(By.CSS_SELECTOR, "form.logout button").click())
    await at(browser, base + "/ui/login")
    await blocking(browser.get, base + "/ui")
    assert browser.current_url == base + "/ui/login"
    await blocking(client.close)


async def test_a_site_that_points_its_name_at_the_node_gets_nothing(make_daemon: Any) -> None:
    """DNS rebinding, as the browser sees it once the name is rebound: rebind.example (the
    attacker's site) now resolves to the node, so the attacker's script is same-origin with
    whatever answers there. The page must not answer to that name."""
    daemon, client, admin = await blocking(lambda: started(make_daemon, **FAST))
    kept = f"browser-rebound-{RUN}"
    await blocking(client.publish, kept, "k1")
    rules = "--host-resolver-rules=MAP rebind.example 127.0.0.1"
    driver = await blocking(lambda: open_browser(extra=[rules]))
    try:
        evil = f"http://rebind.example:{daemon.http_port}"
        await blocking(driver.get, f"{evil}/ui/queue?name={kept}")
        text = await blocking(text_of, driver, "body")
        assert text.startswith("421 misdirected request") and kept not in text
        attack = (
            "const done = arguments[arguments.length - 1];"
            "Promise.all([fetch('/ui/api/overview').then(r => r.status),"
            " fetch('/ui/queue/purge', {method: 'POST', body: 'queue=KEPT&confirm=KEPT',"
            " headers: {'Content-Type': 'application/x-www-form-urlencoded'}})"
            ".then(r => r.status)]).then(done);"
        ).replace("KEPT", kept)
        assert await blocking(driver.execute_async_script, attack) == [421, 421]
        assert (await blocking(admin.queue, kept)).ready == 1
        assert not await blocking(driver.get_cookies)
        # The operator's own way in still works.
        await blocking(driver.get, f"http://localhost:{daemon.http_port}/ui/queue?name={kept}")
        await until(lambda: text_of(driver, "h1"), lambda text: text == kept)
    finally:
        await blocking(driver.quit)
        await blocking(client.close)
