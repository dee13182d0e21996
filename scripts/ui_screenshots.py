"""Screenshots of the admin page for the README (docs/ui-overview.png, docs/ui-queue.png): a
real daemon on this machine's RabbitMQ, PostgreSQL and Redis (a vhost, database and Redis
prefix of its own, removed afterwards), fed a few minutes of varied traffic, photographed by
headless Chromium.

    .venv/bin/python scripts/ui_screenshots.py [--minutes 6] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from selenium.webdriver.common.by import By  # noqa: E402

from tests import servers  # noqa: E402
from tests.bus_client import BusClient  # noqa: E402
from tests.conftest import Backends  # noqa: E402
from tests.daemon_process import DaemonProcess  # noqa: E402
from tests.test_ui_browser import open_browser  # noqa: E402

POLICIES = {
    "orders.*": {"max_retries": 5, "backoff_min_seconds": 1, "backoff_max_seconds": 120},
    "payments": {
        "max_retries": 0,
        "backoff_min_seconds": 1,
        "backoff_max_seconds": 30,
        "ack_deadline_seconds": 60,
    },
}
# queue: (messages a second at the peak, share acked, share nacked, consumed)
TRAFFIC = {
    "orders.created": (14.0, 1.0, 0.0, True),
    "orders.shipped": (6.0, 1.0, 0.0, True),
    "payments": (4.0, 0.9, 0.1, True),
    "emails.outbound": (8.0, 1.0, 0.0, True),
    "search.reindex": (3.0, 0.0, 0.0, False),  # a backlog nobody drains
    "notifications.push": (10.0, 0.97, 0.0, True),  # some left unacked: in flight
}
PAYLOADS = {
    "payments": {"order": "A-{n}", "amount": 49.90, "card": "**** 4242", "currency": "EUR"},
    "orders.created": {"order": "A-{n}", "customer": "c-{n}", "lines": 3, "total": 149.70},
}


def publisher(address: str, queue: str, peak: float, stop: threading.Event) -> None:
    client = BusClient(address)
    number = 0
    started = time.monotonic()
    while not stop.is_set():
        phase = (time.monotonic() - started) / 90
        rate = peak * (0.55 + 0.45 * math.sin(phase + hash(queue) % 7))
        number += 1
        template = PAYLOADS.get(queue, {"id": "{n}", "at": int(time.time())})
        body = json.dumps(template).replace("{n}", str(number))
        client.publish(queue, body)
        stop.wait(random.expovariate(max(rate, 0.2)))
    client.close()


def consumer(address: str, queue: str, acked: float, nacked: float, stop: threading.Event) -> None:
    client = BusClient(address)
    while not stop.is_set():
        delivery = client.try_subscribe(queue, 2)
        if delivery is None:
            continue
        draw = random.random()
        if draw < acked:
            client.ack(delivery.id)
        elif draw < acked + nacked:
            client.nack(delivery.id)
    client.close()


def topic_publisher(address: str, stop: threading.Event) -> None:
    client = BusClient(address)
    number = 0
    while not stop.is_set():
        number += 1
        event = {"user": f"u-{number}", "event": "signed_in"}
        client.topic_publish("user.events", json.dumps(event))
        stop.wait(random.expovariate(5.0))
    client.close()


def topic_consumer(address: str, group: str, stop: threading.Event) -> None:
    client = BusClient(address, "mq.MqTopic")
    while not stop.is_set():
        delivery = client.try_topic_subscribe("user.events", group, 2)
        if delivery is not None:
            client.topic_ack(delivery.id)
    client.close()


def shoot(daemon: DaemonProcess, out: Path) -> None:
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver = open_browser(1360, 900)
    try:
        driver.get(base + "/ui?sort=published&order=desc")
        time.sleep(6)  # one live refresh
        save_full(driver, out / "ui-overview.png")
        driver.get(base + "/ui/queue?name=payments")
        save_full(driver, out / "ui-queue.png")
        driver.set_window_size(390, 844)
        driver.get(base + "/ui")
        time.sleep(1)
        driver.save_screenshot(str(out / "ui-phone.png"))
        assert driver.find_elements(By.CSS_SELECTOR, "#queues tbody tr")
    finally:
        driver.quit()


def save_full(driver: Any, path: Path) -> None:
    """A screenshot of the whole page (at most 2400 pixels high)."""
    bottom = "return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom)"
    for _ in range(2):  # the window's height changes the chrome around the viewport
        inner = driver.execute_script("return window.outerHeight - window.innerHeight")
        driver.set_window_size(1360, min(int(driver.execute_script(bottom)) + inner, 2400))
        time.sleep(0.5)
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so the daemon, vhost, database and Redis keys are removed


def main() -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    vhost, database = servers.unique_name("ui_shots"), servers.unique_name("ui_shots")
    backends = Backends(
        servers.create_vhost(vhost),
        servers.create_database(database),
        servers.unique_name("ui_shots") + ":",
        "event_bus",
    )
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as directory:
        daemon = DaemonProcess(
            Path(directory) / "eventbus-1",
            backends,
            http={"ui_enabled": True},
            cron={"interval_seconds": 0.5},
            log={"level": "info"},
            queues=POLICIES,
        )
        try:
            daemon.wait_ready()
            threads = run_traffic(daemon, stop)
            print(f"traffic for {args.minutes} minutes, page on :{daemon.http_port}/ui")
            stop.wait(args.minutes * 60)
            shoot(daemon, args.out)  # while the traffic goes on
            stop.set()
            for thread in threads:
                thread.join(10)
        finally:
            stop.set()
            daemon.kill()
            servers.delete_vhost(vhost)
            servers.drop_database(database)
            servers.delete_redis_keys(backends.redis_prefix)


def run_traffic(daemon: DaemonProcess, stop: threading.Event) -> list[threading.Thread]:
    address = daemon.grpc_address
    threads = [threading.Thread(target=topic_publisher, args=(address, stop))]
    for group in ("analytics", "crm-sync"):
        threads.append(threading.Thread(target=topic_consumer, args=(address, group, stop)))
    for queue, (peak, acked, nacked, consumed) in TRAFFIC.items():
        threads.append(threading.Thread(target=publisher, args=(address, queue, peak, stop)))
        if consumed:
            args = (address, queue, acked, nacked, stop)
            threads.append(threading.Thread(target=consumer, args=args))
    client = BusClient(address)
    for hours in (1, 2, 6, 12, 24):
        client.delay_publish("emails.outbound", '{"digest": "weekly"}', delay=hours * 3600)
    client.close()
    for thread in threads:
        thread.start()
    return threads


if __name__ == "__main__":
    main()
