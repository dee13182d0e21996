"""Configuration: config.toml plus EVENTBUS_SECTION__KEY environment overrides, validated at load.
The per-queue retry policies, [queues."GLOB"] tables, come from the file alone.

Every problem is reported as one ConfigError line naming the source and the key, e.g.
``config.toml: server.grpc_port: expected an integer 1-65535, got "many"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yarl

from .delivery.validate import MAX_NAME_BYTES, NAME_CHARACTERS, NAME_PATTERN

ENV_PREFIX = "EVENTBUS_"


class ConfigError(Exception):
    """A configuration problem, already phrased as the one line the user sees."""

    def __init__(self, message: str) -> None:
        # A key or variable name may hold a newline or other control character: escape it,
        # so the message stays one line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))


@dataclass(frozen=True)
class Rule:
    """What a key accepts: a Python type, an extra check, and the words that describe both."""

    kind: type
    expected: str
    check: Callable[[Any], bool] = lambda _: True


def _setting(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


def _int(low: int, high: int) -> Rule:
    return Rule(int, f"an integer {low}-{high}", lambda v: low <= v <= high)


def _float(low: float, high: float) -> Rule:
    return Rule(float, f"a number {low:g}-{high:g}", lambda v: low <= v <= high)


def _one_of(*choices: str) -> Rule:
    return Rule(str, "one of " + ", ".join(choices), lambda v: v in choices)


def _text(pattern: str, expected: str) -> Rule:
    return Rule(str, expected, lambda v: re.fullmatch(pattern, v) is not None)


ANY_TEXT = Rule(str, "a string")
HOST = _text(r"\S+", "a host name or address")
BOOL = Rule(bool, "true or false")
PORT = _int(1, 65535)
URL = _text(r"\S+://\S+", "a URL")
SECRET_PATH = Rule(str, "a path to a file holding the value, or empty")
AMQP_URL = re.compile(r"amqps?://\S+")


def _amqp_url(value: Any) -> bool:
    """An amqp:// or amqps:// URL that aio-pika can parse, with a host: a / # or ? in the
    password must be %-encoded, and the port a number up to 65535."""
    if not isinstance(value, str) or not AMQP_URL.fullmatch(value):
        return False
    try:
        url = yarl.URL(value)
        return bool(url.host) and (url.port is None or 0 < url.port < 65536)
    except ValueError:
        return False


AMQP_URL_EXPECTED = "an amqp:// URL with a host (a / # ? in the password %-encoded)"
AMQP_URLS = Rule(
    list,
    f"a list of at most 16 of {AMQP_URL_EXPECTED}",
    lambda v: len(v) <= 16 and all(_amqp_url(u) for u in v),
)


@dataclass(frozen=True)
class ServerConfig:
    grpc_host: str = _setting("0.0.0.0", HOST)
    grpc_port: int = _setting(9091, PORT)
    http_host: str = _setting("127.0.0.1", HOST)
    http_port: int = _setting(7878, PORT)
    node_name: str = _setting(
        "", _text(r"[A-Za-z0-9_.:-]{0,64}", "up to 64 of A-Z a-z 0-9 _ . : -")
    )
    max_message_bytes: int = _setting(4 * 1024 * 1024, _int(1024, 64 * 1024 * 1024))
    shutdown_grace_seconds: float = _setting(10.0, _float(0, 300))
    max_connections: int = _setting(1000, _int(1, 1_000_000))
    max_streams_per_connection: int = _setting(100, _int(1, 10_000))
    max_concurrent_calls: int = _setting(10_000, _int(1, 1_000_000))
    idle_timeout_seconds: float = _setting(300.0, _float(0.1, 86400))
    request_timeout_seconds: float = _setting(30.0, _float(0.1, 3600))
    keepalive_min_ping_interval_seconds: float = _setting(10.0, _float(0, 3600))
    max_client_resets: int = _setting(500, _int(1, 1_000_000))
    client_reset_window_seconds: float = _setting(10.0, _float(0.1, 3600))
    auto_create_queues: bool = _setting(True, BOOL)
    max_streaming_pulls: int = _setting(500, _int(0, 1800))
    reflection: bool = _setting(True, BOOL)

    @property
    def node(self) -> str:
        """The node's name: node_name, or the host name when that is empty."""
        return self.node_name or socket.gethostname()


@dataclass(frozen=True)
class AmqpConfig:
    """The broker (or brokers: urls, tried in url_order, then the next on losing one) and how
    the bus uses it."""

    url: str = _setting(
        "amqp://guest:guest@127.0.0.1:5672/", Rule(str, AMQP_URL_EXPECTED, _amqp_url)
    )
    urls: tuple[str, ...] = _setting((), AMQP_URLS)  # set: replaces url
    url_file: str = _setting("", SECRET_PATH)  # one URL a line: several make urls
    url_order: str = _setting("in_order", _one_of("in_order", "shuffled"))
    queue_type: str = _setting("classic", _one_of("classic", "quorum"))
    namespace: str = _setting(
        "event_bus",
        _text(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", "a name of 1-64 of A-Z a-z 0-9 _ . -"),
    )
    prefetch_count: int = _setting(1000, _int(1, 65535))
    consumers_per_queue: int = _setting(5, _int(1, 100))
    producers_per_queue: int = _setting(2, _int(1, 100))
    reconnect_window_seconds: float = _setting(60.0, _float(1, 3600))
    heartbeat_seconds: int = _setting(10, _int(1, 600))
    buffer_hold_seconds: float = _setting(300.0, _float(0.5, 1500))
    consumer_idle_seconds: float = _setting(60.0, _float(1, 86400))
    publish_channels: int = _setting(8, _int(1, 256))
    queue_idle_expiry_seconds: int = _setting(0, _int(0, 365 * 86400))
    max_consumed_queues: int = _setting(200, _int(1, 1000))
    buffer_max_bytes: int = _setting(64 * 1024 * 1024, _int(1024 * 1024, 16 * 1024**3))

    @property
    def brokers(self) -> tuple[str, ...]:
        """The broker URLs to try: urls, or url alone."""
        return self.urls or (self.url,)


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str = _setting("postgresql://postgres@127.0.0.1:5432/eventbus", URL)
    dsn_file: str = _setting("", SECRET_PATH)
    pool_size: int = _setting(10, _int(1, 200))


@dataclass(frozen=True)
class RedisConfig:
    url: str = _setting(
        "redis://127.0.0.1:6379/0", _text(r"(redis|rediss|unix)://\S+", "a redis:// URL")
    )
    url_file: str = _setting("", SECRET_PATH)
    key_prefix: str = _setting("event_bus:", ANY_TEXT)
    lock_timeout_seconds: float = _setting(0.25, _float(0.01, 5))


@dataclass(frozen=True)
class DeliveryConfig:
    max_retries: int = _setting(3, _int(0, 1000))
    ack_deadline_seconds: int = _setting(1800, _int(1, 7 * 86400))
    nack_redelivery_delay_seconds: int = _setting(600, _int(0, 7 * 86400))
    max_delay_seconds: int = _setting(365 * 86400, _int(1, 10 * 365 * 86400))
    dedup_window_seconds: int = _setting(600, _int(1, 7 * 86400))


QUEUE_NAME = Rule(
    str,
    f"a queue name of 1-{MAX_NAME_BYTES} bytes of {NAME_CHARACTERS}",
    lambda v: NAME_PATTERN.fullmatch(v) is not None and len(v.encode()) <= MAX_NAME_BYTES,
)
# A queue name with fnmatch wildcards: *, ?, [...] and [!...] over the characters of a name.
NAME_CHARACTER = NAME_PATTERN.pattern.removesuffix("+")
GLOB = re.compile(rf"(?:{NAME_CHARACTER}|[*?]|\[!?{NAME_CHARACTER}+\])+")


@dataclass(frozen=True)
class QueuePolicyConfig:
    """One [queues."GLOB"] table: the retry policy of the queues its glob matches. A key left
    out of the table takes [delivery]'s value (ack_deadline_seconds, max_retries) or the
    default here."""

    glob: str
    ack_deadline_seconds: int = _setting(1800, _int(1, 7 * 86400))
    max_retries: int = _setting(3, _int(0, 1000))
    backoff_min_seconds: float = _setting(1.0, _float(0, 7 * 86400))
    backoff_max_seconds: float = _setting(600.0, _float(0, 7 * 86400))
    dead_letter_queue: str | None = _setting(None, QUEUE_NAME)


@dataclass(frozen=True)
class CronConfig:
    republish_enabled: bool = _setting(True, BOOL)
    delay_publish_enabled: bool = _setting(True, BOOL)
    interval_seconds: float = _setting(1.0, _float(0.05, 3600))
    lock_ttl_seconds: int = _setting(1800, _int(1, 86400))
    claim_seconds: float = _setting(60.0, _float(1, 3600))


@dataclass(frozen=True)
class BackgroundConfig:
    enabled: bool = _setting(True, BOOL)
    workers: int = _setting(20, _int(1, 1000))


PEM_PATH = Rule(str, "a path to a PEM file, or empty")


@dataclass(frozen=True)
class TlsConfig:
    """TLS on the gRPC port (and on HTTP with http = true). A relative path is looked up in
    $CREDENTIALS_DIRECTORY (systemd's LoadCredential=) when that is set."""

    cert_file: str = _setting("", PEM_PATH)
    key_file: str = _setting("", PEM_PATH)
    client_ca_file: str = _setting("", PEM_PATH)  # with it, clients must present a certificate
    http: bool = _setting(False, BOOL)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


AUTH_MODES = ("off", "token", "mtls", "any")


@dataclass(frozen=True)
class AuthConfig:
    mode: str = _setting("off", _one_of(*AUTH_MODES))
    identities: tuple[IdentityConfig, ...] = ()  # [auth.identities.NAME] tables, file only


IDENTITY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHA256_HEX = _text(r"[0-9a-fA-F]{64}", "the hex SHA-256 of a token: 64 of 0-9 a-f")
EMPTY_TOKEN_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# Certificate subjects: RFC 4514 text, "CN=orders-service,O=Example", compared as a set of
# attributes whatever their order, spacing and the case of their names (values: exactly).
ATTRIBUTE_NAMES = {  # Python's ssl module's names -> RFC 4514's short ones
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}
_SHORT_NAMES = {long.lower(): short for long, short in ATTRIBUTE_NAMES.items()}
ATTRIBUTE_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*")
SubjectKey = tuple[tuple[str, str], ...]
SUBJECT_EXPECTED = (
    'a certificate subject of KEY=VALUE pairs, such as "CN=orders-service,O=Example" '
    "(a , + or \\ inside a value escaped with \\)"
)


def subject_key(attributes: Iterable[tuple[str, str]]) -> SubjectKey:
    """Subject attributes as compared: short names, upper case, in sorted order."""
    return tuple(sorted((_SHORT_NAMES.get(k.lower(), k).upper(), v) for k, v in attributes))


def parse_subject(text: str) -> SubjectKey:
    """The key (subject_key) of a subject written as RFC 4514 text; ValueError when it is not
    KEY=VALUE pairs separated by , or +."""
    attributes = [_attribute(part) for part in _unescaped_split(text)]
    return subject_key(attributes)


def _unescaped_split(text: str) -> list[list[tuple[str, bool]]]:
    """text split at each , or + not escaped, as (character, escaped) pairs; a \\ escapes the
    next character, or stands with two hex digits for one byte (of UTF-8)."""
    parts: list[list[tuple[str, bool]]] = [[]]
    pending = bytearray()  # hex-escaped bytes, decoded together (a character may take several)
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", text[i + 1 : i + 3]):
            pending.append(int(text[i + 1 : i + 3], 16))
            i += 3
            continue
        parts[-1].extend((c, True) for c in pending.decode())  # UnicodeDecodeError: ValueError
        pending.clear()
        if char == "\\":
            if i + 1 == len(text):
                raise ValueError("a \\ at the end")
            parts[-1].append((text[i + 1], True))
            i += 2
            continue
        if char in ",+":
            parts.append([])
        else:
            parts[-1].append((char, False))
        i += 1
    parts[-1].extend((c, True) for c in pending.decode())
    return parts


def _subject_or_empty(text: str) -> bool:
    try:
        return not text or bool(parse_subject(text))
    except ValueError:
        return False


def _attribute(part: list[tuple[str, bool]]) -> tuple[str, str]:
    """One KEY=VALUE of a subject: spaces around KEY and VALUE dropped unless escaped."""
    at = next((i for i, (c, escaped) in enumerate(part) if c == "=" and not escaped), None)
    if at is None:
        raise ValueError("an attribute without =")
    key = "".join(c for c, _ in part[:at]).strip()
    value = part[at + 1 :]
    while value and value[0] == (" ", False):
        value.pop(0)
    while value and value[-1] == (" ", False):
        value.pop()
    if not ATTRIBUTE_TYPE.fullmatch(key) or not value:
        raise ValueError("an attribute without a name or a value")
    return key, "".join(c for c, _ in value)


def _globs_rule() -> Rule:
    def check(value: list[Any]) -> bool:
        return all(isinstance(v, str) and GLOB.fullmatch(v) for v in value)

    return Rule(list, "a list of globs of queue and topic names", check)


@dataclass(frozen=True)
class IdentityConfig:
    """One [auth.identities.NAME] table: how a caller proves it is NAME, and what NAME may do."""

    name: str
    token_sha256: str = _setting(
        "", Rule(str, SHA256_HEX.expected, lambda v: v == "" or SHA256_HEX.check(v))
    )
    certificate_subject: str = _setting("", Rule(str, SUBJECT_EXPECTED, _subject_or_empty))
    publish: tuple[str, ...] = _setting((), _globs_rule())
    subscribe: tuple[str, ...] = _setting((), _globs_rule())
    admin: bool = _setting(False, BOOL)
    publish_rate: float = _setting(0.0, _float(0, 10_000_000))  # messages/s; 0: no limit
    publish_burst: int = _setting(0, _int(0, 10_000_000))  # 0: one second's worth
    max_waiting_pulls: int = _setting(0, _int(0, 1_000_000))  # 0: no limit


# A name the admin page is reached by: a DNS name, an IPv4 address or a [bracketed] IPv6 one.
UI_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]")
UI_HOSTS = Rule(
    list,
    "a list of at most 64 host names the admin page is reached by (no port, no scheme)",
    lambda v: len(v) <= 64 and all(isinstance(h, str) and UI_HOST.fullmatch(h) for h in v),
)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP port's optional parts (its address: server.http_host, server.http_port)."""

    ui_enabled: bool = _setting(False, BOOL)  # the admin page at /ui
    # Host names /ui answers to besides server.http_host, localhost, 127.0.0.1, [::1] and
    # the machine's host name: a request naming any other Host is refused (DNS rebinding).
    ui_hosts: tuple[str, ...] = _setting((), UI_HOSTS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ui_hosts", tuple(self.ui_hosts))  # a TOML list, kept as a tuple


@dataclass(frozen=True)
class LogConfig:
    level: str = _setting("info", _one_of("debug", "info", "warning", "error"))
    format: str = _setting("text", _one_of("text", "json"))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    amqp: AmqpConfig = AmqpConfig()
    postgres: PostgresConfig = PostgresConfig()
    redis: RedisConfig = RedisConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    cron: CronConfig = CronConfig()
    background: BackgroundConfig = BackgroundConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    tls: TlsConfig = TlsConfig()
    auth: AuthConfig = AuthConfig()
    queues: tuple[QueuePolicyConfig, ...] = ()  # in file order: the first matching glob wins


QUEUES = "queues"  # [queues."GLOB"] tables, set in the file only
SECTIONS: dict[str, type] = {
    f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config) if f.name != QUEUES
}
QUEUE_RULES: dict[str, Rule] = {
    f.name: f.metadata["rule"] for f in dataclasses.fields(QueuePolicyConfig) if f.metadata
}


def load(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file at path, apply environment overrides, and validate every key."""
    raw = _read_toml(path)
    source = os.path.basename(path)
    environ = os.environ if environ is None else environ
    sections = {name: _section_of(raw, name, source) for name in SECTIONS}
    identities = _identity_tables(source, sections["auth"].pop(IDENTITIES, {}))
    for name in raw:
        if name not in SECTIONS and name != QUEUES:
            raise ConfigError(f"{source}: {name}: unknown section")
    for name, table in sections.items():
        _check_table(source, name, table)
    queues = _queue_tables(source, raw)
    for var, (section, key, value) in _env_overrides(environ).items():
        if (section, key) in BROKER_KEYS:  # the one set in the environment wins over the file's
            sections[section].pop(BROKER_KEYS[section, key], None)
        sections[section][key] = value
        _check_value(var, section, key, value)
    credentials = environ.get(CREDENTIALS_DIRECTORY, "")
    _read_secrets(source, sections, credentials)
    _check_brokers(source, sections["amqp"])
    config = Config(**{name: SECTIONS[name](**table) for name, table in sections.items()})
    _check_channel_budget(source, config.amqp, config.server.max_streaming_pulls)
    config = dataclasses.replace(
        config,
        queues=_policies(source, queues, config),
        tls=_located(config.tls, credentials),
        auth=dataclasses.replace(config.auth, identities=identities),
    )
    _check_security(source, config)
    return config


IDENTITIES = "identities"  # [auth.identities.NAME] tables, set in the file only
IDENTITY_RULES: dict[str, Rule] = {
    f.name: f.metadata["rule"] for f in dataclasses.fields(IdentityConfig) if f.metadata
}
CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"  # systemd's LoadCredential= puts files there
SECRETS = {"amqp": "url", "postgres": "dsn", "redis": "url"}  # KEY_file reads KEY from a file


def _identity_tables(source: str, tables: Any) -> tuple[IdentityConfig, ...]:
    """The [auth.identities.NAME] tables, every key checked; tokens and subjects unique."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: auth.{IDENTITIES}: expected a table, got {_show(tables)}")
    identities = []
    for name, table in tables.items():
        section = f"auth.{IDENTITIES}.{_show(name)}"
        if not IDENTITY_NAME.fullmatch(name):
            raise ConfigError(f"{source}: {section}: expected a name of 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {section}: expected a table, got {_show(table)}")
        _check_table(source, section, table, IDENTITY_RULES)
        lists = {key: tuple(table[key]) for key in ("publish", "subscribe") if key in table}
        token = {"token_sha256": table.get("token_sha256", "").lower()}
        if token["token_sha256"] == EMPTY_TOKEN_SHA256:
            raise ConfigError(
                f"{source}: {section}.token_sha256: is the SHA-256 of an empty token; "
                "use a random token of its own"
            )
        identities.append(IdentityConfig(name, **{**table, **lists, **token}))
    _check_unique(source, identities, "token_sha256", str)
    _check_unique(source, identities, "certificate_subject", parse_subject)
    return tuple(identities)


def _check_unique(
    source: str, identities: list[IdentityConfig], key: str, compared: Callable[[str], Any]
) -> None:
    """No two identities with the same credential (subjects: as compared, whatever the order
    of their attributes)."""
    seen: dict[Any, str] = {}
    for identity in identities:
        value = getattr(identity, key)
        if not value:
            continue
        if compared(value) in seen:
            raise ConfigError(
                f"{source}: auth.{IDENTITIES}.{identity.name}.{key}: the same as "
                f"{seen[compared(value)]}'s; each identity needs its own"
            )
        seen[compared(value)] = identity.name


def _read_secrets(source: str, sections: dict[str, dict[str, Any]], credentials: str) -> None:
    """amqp.url_file, postgres.dsn_file, redis.url_file: the value read from that file (a
    relative path in $CREDENTIALS_DIRECTORY), checked like the key itself."""
    for section, key in SECRETS.items():
        path = sections[section].get(f"{key}_file", "")
        if not path:
            continue
        where = f"{source}: {section}.{key}_file"
        try:
            with open(_in_credentials(path, credentials), encoding="utf-8") as file:
                text = file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{where}: cannot read {path}: {error}") from None
        value: str | list[str] = text
        if section == "amqp" and len(text.split()) > 1:
            key, value = "urls", text.split()  # one broker URL a line
        if section == "amqp":  # the file's brokers replace the table's, as any secret file does
            sections[section].pop(BROKER_KEYS[section, key], None)
        rule = _rules(section)[key]
        if not rule.check(value):
            raise ConfigError(f"{where}: the file must hold {rule.expected}")
        sections[section][key] = value


def _in_credentials(path: str, credentials: str) -> str:
    return os.path.join(credentials, path) if credentials and not os.path.isabs(path) else path


def _located(tls: TlsConfig, credentials: str) -> TlsConfig:
    return TlsConfig(
        cert_file=tls.cert_file and _in_credentials(tls.cert_file, credentials),
        key_file=tls.key_file and _in_credentials(tls.key_file, credentials),
        client_ca_file=tls.client_ca_file and _in_credentials(tls.client_ca_file, credentials),
        http=tls.http,
    )


def _check_security(source: str, config: Config) -> None:
    """The [tls] and [auth] keys that only make sense together."""
    tls, auth = config.tls, config.auth
    if bool(tls.cert_file) != bool(tls.key_file):
        raise ConfigError(f"{source}: tls.cert_file: and tls.key_file must be set together")
    if tls.client_ca_file and not tls.cert_file:
        raise ConfigError(f"{source}: tls.client_ca_file: needs tls.cert_file and tls.key_file")
    if tls.http and not tls.cert_file:
        raise ConfigError(f"{source}: tls.http: needs tls.cert_file and tls.key_file")
    if auth.mode in ("mtls", "any") and not tls.client_ca_file:
        raise ConfigError(
            f"{source}: auth.mode: {_show(auth.mode)} needs tls.client_ca_file (client "
            "certificates are checked against it)"
        )
    if auth.mode != "off" and not auth.identities:
        raise ConfigError(
            f"{source}: auth.mode: {_show(auth.mode)} needs at least one [auth.identities.NAME]"
        )
    needed = {"token": "token_sha256", "mtls": "certificate_subject"}.get(auth.mode)
    if needed and not any(getattr(identity, needed) for identity in auth.identities):
        raise ConfigError(
            f"{source}: auth.mode: {_show(auth.mode)} needs an [auth.identities.NAME] with "
            f"{needed}: no caller could prove who it is"
        )


CHANNEL_BUDGET = 1800  # of RabbitMQ's default channel_max 2047; the rest is the bus's own


BROKER_KEYS = {("amqp", "url"): "urls", ("amqp", "urls"): "url"}  # each replaces the other


def _check_brokers(source: str, amqp: dict[str, Any]) -> None:
    """amqp.url or amqp.urls, not both; urls kept as a tuple."""
    if "urls" not in amqp:
        return
    if not amqp["urls"]:
        raise ConfigError(f"{source}: amqp.urls: expected at least one amqp:// URL, got []")
    if "url" in amqp:
        raise ConfigError(f"{source}: amqp.urls: set amqp.url or amqp.urls, not both")
    amqp["urls"] = tuple(amqp["urls"])


def _check_channel_budget(source: str, amqp: AmqpConfig, streams: int) -> None:
    """Consumers of every queue at once, the publishing channels and a channel per
    StreamingPull must fit in one connection's channels."""
    consuming = amqp.max_consumed_queues * amqp.consumers_per_queue
    if consuming + amqp.publish_channels + streams > CHANNEL_BUDGET:
        raise ConfigError(
            f"{source}: amqp.max_consumed_queues: times amqp.consumers_per_queue, plus "
            f"amqp.publish_channels and server.max_streaming_pulls, must be at most "
            f"{CHANNEL_BUDGET} channels, got {amqp.max_consumed_queues} x "
            f"{amqp.consumers_per_queue} + {amqp.publish_channels} + {streams}"
        )


def _queue_tables(source: str, raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The [queues."GLOB"] tables in file order, every key checked."""
    queues = raw.get(QUEUES, {})
    if not isinstance(queues, dict):
        raise ConfigError(f"{source}: {QUEUES}: expected a table, got {_show(queues)}")
    for glob, table in queues.items():
        _check_queue_table(source, glob, table)
    return list(queues.items())


def _check_queue_table(source: str, glob: str, table: Any) -> None:
    section = f"{QUEUES}.{_show(glob)}"
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {section}: expected a table, got {_show(table)}")
    if not GLOB.fullmatch(glob) or _glob_length(glob) > MAX_NAME_BYTES:
        raise ConfigError(
            f"{source}: {section}: expected a glob of queue names: 1-{MAX_NAME_BYTES} of "
            f"{NAME_CHARACTERS}, or the wildcards * ? [...] [!...]"
        )
    _check_table(source, section, table, QUEUE_RULES)
    low = table.get("backoff_min_seconds", QueuePolicyConfig.backoff_min_seconds)
    high = table.get("backoff_max_seconds", QueuePolicyConfig.backoff_max_seconds)
    if low > high:
        raise ConfigError(
            f"{source}: {section}.backoff_min_seconds: expected at most backoff_max_seconds "
            f"({_show(high)}), got {_show(low)}"
        )


def _glob_length(glob: str) -> int:
    """The shortest length of a name the glob matches."""
    return len(re.sub(r"\[[^\]]*\]", "?", glob).replace("*", ""))


def _policies(
    source: str, tables: list[tuple[str, dict[str, Any]]], config: Config
) -> tuple[QueuePolicyConfig, ...]:
    """The queue tables as policies, keys left out taken from [delivery]; neither a glob nor a
    dead-letter queue may lie among names reserved by RabbitMQ or the bus."""
    inherited = {
        "ack_deadline_seconds": config.delivery.ack_deadline_seconds,
        "max_retries": config.delivery.max_retries,
    }
    policies = tuple(QueuePolicyConfig(glob, **{**inherited, **table}) for glob, table in tables)
    for policy in policies:
        section = f"{QUEUES}.{_show(policy.glob)}"
        _check_unreserved(f"{source}: {section}", policy.glob, config.amqp.namespace)
        if policy.dead_letter_queue is not None:
            key = f"{source}: {section}.dead_letter_queue"
            _check_unreserved(key, policy.dead_letter_queue, config.amqp.namespace)
    return policies


def _check_unreserved(where: str, name: str, namespace: str) -> None:
    """A name (or a glob's literal start) must not be RabbitMQ's amq. nor the bus's own."""
    if name.startswith("amq."):
        raise ConfigError(f"{where}: must not start with amq. (reserved by RabbitMQ)")
    if name == namespace or name.startswith(namespace + "."):
        raise ConfigError(f"{where}: must not be inside amqp.namespace {_show(namespace)}")


def _read_toml(path: str) -> dict[str, Any]:
    """The file's TOML document; any problem reading or parsing it is one ConfigError line."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None


def _section_of(raw: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {name}: expected a table, got {_show(table)}")
    return dict(table)


def _check_table(
    source: str, section: str, table: dict[str, Any], rules: dict[str, Rule] | None = None
) -> None:
    for key, value in table.items():
        _check_value(source, section, key, value, rules)


def _rules(section: str) -> dict[str, Rule]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(SECTIONS[section]) if f.metadata}


def _check_value(
    source: str, section: str, key: str, value: Any, rules: dict[str, Rule] | None = None
) -> None:
    rule = (_rules(section) if rules is None else rules).get(key)
    if rule is None:
        raise ConfigError(f"{source}: {section}.{key}: unknown key")
    if not (_is_kind(value, rule.kind) and rule.check(value)):
        got = _show(value) if key not in SECRET_KEYS else _shape(value)
        raise ConfigError(f"{source}: {section}.{key}: expected {rule.expected}, got {got}")


# Keys whose refused value is not repeated in the error line (it goes to logs): a token pasted
# where its hash belongs, URLs and DSNs with passwords.
SECRET_KEYS = {"token_sha256", "url", "urls", "dsn"}


def _shape(value: Any) -> str:
    """What a refused secret looks like, without it: its kind and length."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters (not shown: it may be secret)"
    return f"a {type(value).__name__}"


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:
        return repr(value)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, str, Any]]:
    """EVENTBUS_SECTION__KEY=value pairs as {variable: (section, key, typed value)}."""
    overrides = {}
    for var, text in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section, _, key = var[len(ENV_PREFIX) :].lower().partition("__")
        if section == QUEUES:
            raise ConfigError(f'{var}: {QUEUES}: set in the file only, as [queues."GLOB"] tables')
        if section not in SECTIONS:
            raise ConfigError(f"{var}: {section}: unknown section")
        rule = _rules(section).get(key)
        if rule is None:
            raise ConfigError(f"{var}: {section}.{key}: unknown key")
        overrides[var] = (section, key, _parse_env(text, rule.kind))
    return overrides


def _parse_env(text: str, kind: type) -> Any:
    """Turn an environment string into the key's type; leave it a string when it does not parse."""
    parsers: dict[type, Callable[[str], Any]] = {
        int: int,
        float: float,
        bool: _parse_bool,
        list: str.split,  # several URLs: "amqp://a amqp://b" (a , may be in a password)
    }
    try:
        return parsers.get(kind, str)(text.strip() if kind is not str else text)
    except ValueError:
        return text


def _parse_bool(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]
