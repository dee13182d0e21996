"""Reload: config.toml read again while the daemon runs (SIGHUP, `systemctl reload`).

Which keys changed is a plain comparison of two Config values, field by field. The keys a
running daemon can take in place (LIVE_KEYS, the TLS keys while TLS is on) are applied; every
other changed key keeps its running value and is named in one log line, to take effect at the
next restart. A file that fails validation changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from ..config import Config

logger = logging.getLogger(__name__)

LIVE_KEYS = frozenset(
    {
        "auth.mode",
        "auth.identities",  # tokens, certificate subjects, permissions and quotas
        "queues",
        "delivery.max_retries",  # the [delivery] keys the default queue policy is made of
        "delivery.ack_deadline_seconds",
        "delivery.nack_redelivery_delay_seconds",
        "log.level",
        "cron.interval_seconds",
    }
)
TLS_KEYS = frozenset({"tls.cert_file", "tls.key_file", "tls.client_ca_file"})

# Libraries that log each call, frame or failed connect: never below warning (see cli).
NOISY_LOGGERS = (
    *("aiormq", "aio_pika", "asyncio", "hypercorn.error", "redis"),
    *("grpclib", "h2", "hpack"),
)


def live_keys(new: Config, *, tls_running: bool) -> frozenset[str]:
    """The keys a daemon can change in place: the TLS files while it serves TLS and new keeps
    it on; auth.mode unless new asks for client certificates a daemon without TLS never sees."""
    keys = set(LIVE_KEYS)
    if tls_running and new.tls.enabled:
        keys |= TLS_KEYS
    if not tls_running and new.auth.mode == "mtls":
        keys.discard("auth.mode")
    return frozenset(keys)


@dataclass(frozen=True)
class Plan:
    """What a reload does: the configuration to run (running with the live keys of the new
    one), the changed keys it takes, and the changed keys it leaves for a restart."""

    config: Config
    applied: list[str]
    restart: list[str]


def plan(running: Config, new: Config, live: Collection[str]) -> Plan:
    """The Plan of a reload from running to new, taking the keys in live."""
    changed = changed_keys(running, new)
    applied = [key for key in changed if key in live]
    restart = [key for key in changed if key not in live]
    config = running
    for key in applied:
        config = _with(config, key.split("."), _value(new, key))
    return Plan(config, applied, restart)


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted names of the keys whose values differ ("amqp.url", "queues"), in the order
    Config declares them; a table of tables (queues, auth.identities) counts as one key."""
    return list(_differences(old, new, ""))


def _differences(old: Any, new: Any, prefix: str) -> Iterator[str]:
    for field in dataclasses.fields(old):
        before, after = getattr(old, field.name), getattr(new, field.name)
        key = prefix + field.name
        if dataclasses.is_dataclass(before) and type(before) is type(after):
            yield from _differences(before, after, key + ".")
        elif before != after:
            yield key


def _value(config: Any, key: str) -> Any:
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _with(config: Any, names: list[str], value: Any) -> Any:
    """config (a frozen dataclass) with the key at names set to value."""
    first, *rest = names
    inner = _with(getattr(config, first), rest, value) if rest else value
    return dataclasses.replace(config, **{first: inner})


def set_log_level(level: str) -> None:
    """The root logger's level (debug, info, warning, error), the noisy libraries at warning
    or above."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def report(result: Plan) -> None:
    """One line of what the reload applied, one of what needs a restart (when anything does)."""
    if result.applied:
        logger.info("reload: applied %s", ", ".join(result.applied))
    if result.restart:
        logger.warning("need a restart to take effect: %s", ", ".join(result.restart))
    if not (result.applied or result.restart):
        logger.info("reload: no key changed")
