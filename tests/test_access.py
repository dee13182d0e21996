"""Identities and permissions without a server: bearer tokens, certificate subjects, globs, the
caller of a call and require(); the [auth], [tls] and identity keys of config.toml, and secrets
read from files or systemd credentials."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest

from eventbus.config import (
    AuthConfig,
    ConfigError,
    IdentityConfig,
    load,
    parse_subject,
)
from eventbus.errors import PermissionDenied, Unauthenticated
from eventbus.security.access import (
    NOBODY,
    Access,
    Identity,
    Permission,
    caller,
    certificate_key,
    require,
    reset_caller,
    set_caller,
    subject_of,
)

TOKENS = {"orders": "orders-secret-token", "audit": "audit-secret-token", "ops": "ops-token"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_access(mode: str = "token") -> Access:
    identities = tuple(
        IdentityConfig(name, token_sha256=sha(token), publish=("orders.*",))
        for name, token in TOKENS.items()
    )
    return Access(AuthConfig(mode=mode, identities=identities))


def cert(*attributes: tuple[str, str]) -> dict[str, Any]:
    """A peer certificate as ssl.getpeercert() gives it, one attribute per relative name."""
    return {"subject": tuple(((key, value),) for key, value in attributes)}


def authenticate(
    access_: Access, authorization: Any = None, certificate: dict[str, Any] | None = None
) -> Identity:
    metadata = {} if authorization is None else {"authorization": authorization}
    return access_.authenticate(metadata, certificate)


def refusal(access_: Access, authorization: Any = None, **kwargs: Any) -> str:
    with pytest.raises(Unauthenticated) as caught:
        authenticate(access_, authorization, **kwargs)
    return caught.value.message


# Bearer tokens


@pytest.mark.parametrize(
    "header",
    [
        "Bearer orders-secret-token",
        "bearer orders-secret-token",
        "BEARER orders-secret-token",
        "Bearer   orders-secret-token  ",
    ],
)
def test_a_bearer_token_names_its_identity(header: str) -> None:
    assert authenticate(token_access(), header).name == "orders"


def test_each_token_is_its_own_identity() -> None:
    checked = token_access()
    assert {authenticate(checked, f"Bearer {t}").name for t in TOKENS.values()} == set(TOKENS)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "this server needs a bearer token"),
        ("Bearer wrong-token", "unknown token"),
        ("Bearer ORDERS-SECRET-TOKEN", "unknown token"),
        ("Bearer ", "empty bearer token"),
        ("Bearer", 'authorization metadata must be "Bearer <token>"'),
        ("Basic b3JkZXJzOnNlY3JldA==", 'authorization metadata must be "Bearer <token>"'),
        ("orders-secret-token", 'authorization metadata must be "Bearer <token>"'),
        ("Bearer " + "x" * 5000, "malformed authorization metadata"),
        (b"Bearer orders-secret-token", "malformed authorization metadata"),
    ],
)
def test_missing_wrong_and_malformed_tokens_are_unauthenticated(header: Any, reason: str) -> None:
    assert refusal(token_access(), header) == reason


def test_a_token_is_compared_with_every_stored_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time a lookup takes tells nothing of which token, if any, matched."""
    checked = token_access()
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token in ("orders-secret-token", "ops-token", "nobody's"):
        compared.clear()
        with contextlib.suppress(Unauthenticated):
            authenticate(checked, f"Bearer {token}")
        assert len(compared) == len(TOKENS), token


def test_the_token_itself_is_never_kept() -> None:
    checked = token_access()
    kept = repr(vars(checked)) + repr(checked._tokens)
    assert all(
        token not in kept and token.encode() not in kept.encode() for token in TOKENS.values()
    )


def test_auth_off_makes_every_caller_nobody_who_may_do_everything() -> None:
    off = Access(AuthConfig())
    assert not off.enabled
    assert authenticate(off) is NOBODY
    assert authenticate(off, "Bearer made-up") is NOBODY
    assert NOBODY.may(Permission.PUBLISH, "any.queue") and NOBODY.may(Permission.SUBSCRIBE, "x")
    assert NOBODY.may(Permission.ADMIN)


# Certificates and modes

SUBJECTS = {"orders": "CN=orders-service,O=Example", "audit": "CN=audit"}


def both_access(mode: str) -> Access:
    identities = tuple(
        IdentityConfig(name, token_sha256=sha(TOKENS[name]), certificate_subject=subject)
        for name, subject in SUBJECTS.items()
    )
    return Access(AuthConfig(mode=mode, identities=identities))


ORDERS_CERT = cert(("organizationName", "Example"), ("commonName", "orders-service"))


def test_a_certificate_subject_matches_whatever_the_order_of_its_attributes() -> None:
    checked = both_access("mtls")
    assert authenticate(checked, certificate=ORDERS_CERT).name == "orders"
    reordered = cert(("commonName", "orders-service"), ("organizationName", "Example"))
    assert authenticate(checked, certificate=reordered).name == "orders"
    assert authenticate(checked, certificate=cert(("commonName", "audit"))).name == "audit"


@pytest.mark.parametrize(
    "other",
    [
        cert(("commonName", "orders-service")),  # an attribute fewer
        cert(("commonName", "orders-service"), ("organizationName", "example")),  # value case
        cert(("commonName", "orders-service"), ("organizationName", "Example"), ("C", "DE")),
        cert(("commonName", "orders-service,O=Example")),  # one value holding the others
        cert(("commonName", "audit,O=x")),
        {"subject": ()},
    ],
)
def test_any_other_subject_is_unauthenticated(other: dict[str, Any]) -> None:
    message = refusal(both_access("mtls"), certificate=other)
    assert message.startswith("no identity has the certificate subject")


def test_an_empty_certificate_is_no_certificate() -> None:
    """ssl.getpeercert() gives {} for a certificate it did not verify."""
    assert refusal(both_access("mtls"), certificate={}) == "this server needs a client certificate"


def test_the_refusal_shows_the_subject_as_rfc_4514_text() -> None:
    spoof = cert(("commonName", "orders-service,O=Example"), ("organizationalUnitName", "a+b"))
    assert subject_of(spoof) == r"CN=orders-service\,O\=Example,OU=a\+b"
    assert parse_subject(subject_of(spoof)) == certificate_key(spoof)
    assert subject_of(cert(("commonName", " padded "))) == r"CN=\ padded\ "


@pytest.mark.parametrize(
    "written",
    [
        "CN=orders-service,O=Example",
        "O=Example, CN=orders-service",
        "  cn = orders-service ,  o=Example ",
        "commonName=orders-service+organizationName=Example",
        r"CN=orders\2Dservice,O=Example",
    ],
)
def test_written_subjects_compare_as_sets_of_attributes(written: str) -> None:
    assert parse_subject(written) == certificate_key(ORDERS_CERT)


def test_escaped_characters_stay_inside_a_value() -> None:
    assert parse_subject(r"CN=a\,O=b") == (("CN", "a,O=b"),)
    assert parse_subject(r"CN=a\2CO=b") == (("CN", "a,O=b"),)
    assert parse_subject(r"CN=\C3\A9t\C3\A9") == (("CN", "été"),)
    assert parse_subject(r"CN=\ x\ ") == (("CN", " x "),)
    assert parse_subject("OU=a,OU=b") == (("OU", "a"), ("OU", "b"))  # both kept


@pytest.mark.parametrize(
    "written", ["CN", "=x", "CN=", "CN=a,", "CN=a,,O=b", "CN=a\\", r"CN=\C3", "C N=a"]
)
def test_subjects_that_are_not_key_value_pairs_are_refused(written: str) -> None:
    with pytest.raises(ValueError):
        parse_subject(written)


def test_mode_token_ignores_certificates_and_mtls_ignores_tokens() -> None:
    assert refusal(both_access("token"), certificate=ORDERS_CERT) == (
        "this server needs a bearer token"
    )
    assert refusal(both_access("mtls"), f"Bearer {TOKENS['audit']}") == (
        "this server needs a client certificate"
    )
    mtls = both_access("mtls")
    assert authenticate(mtls, f"Bearer {TOKENS['audit']}", certificate=ORDERS_CERT).name == (
        "orders"
    )


def test_mode_any_takes_either_and_a_token_sent_decides() -> None:
    anyone = both_access("any")
    assert authenticate(anyone, certificate=ORDERS_CERT).name == "orders"
    assert authenticate(anyone, f"Bearer {TOKENS['audit']}").name == "audit"
    assert authenticate(anyone, f"Bearer {TOKENS['audit']}", certificate=ORDERS_CERT).name == (
        "audit"
    )
    assert refusal(anyone, "Bearer wrong", certificate=ORDERS_CERT) == "unknown token"
    assert refusal(anyone) == "this server needs a bearer token or a client certificate"


# Globs and require()


def test_globs_match_whole_names_case_sensitively() -> None:
    who = Identity(
        "svc", publish=("orders.*", "audit", "log-?", "[ab]x", "[!ab]y"), subscribe=("*",)
    )
    allowed = ["orders.a", "orders.a.b", "orders.", "audit", "log-1", "ax", "bx", "cy"]
    refused = ["orders", "Orders.a", "xorders.a", "audit.x", "the-audit", "log-12", "cx", "ay"]
    assert [n for n in allowed if not who.may(Permission.PUBLISH, n)] == []
    assert [n for n in refused if who.may(Permission.PUBLISH, n)] == []
    assert who.may(Permission.SUBSCRIBE, "anything.at.all")
    assert not who.may(Permission.ADMIN)


def test_an_identity_with_no_globs_may_do_nothing() -> None:
    who = Identity("empty")
    assert not who.may(Permission.PUBLISH, "")
    assert not who.may(Permission.PUBLISH, "orders.a")
    assert not who.may(Permission.SUBSCRIBE, "orders.a")


def test_publish_and_subscribe_are_separate() -> None:
    who = Identity("w", publish=("out.*",), subscribe=("in.*",), admin=True)
    assert who.may(Permission.PUBLISH, "out.1") and not who.may(Permission.SUBSCRIBE, "out.1")
    assert who.may(Permission.SUBSCRIBE, "in.1") and not who.may(Permission.PUBLISH, "in.1")
    assert who.may(Permission.ADMIN)


def as_caller(identity: Identity, permission: Permission, name: str = "") -> str:
    token = set_caller(identity)
    try:
        with pytest.raises(PermissionDenied) as caught:
            require(permission, name)
        return caught.value.message
    finally:
        reset_caller(token)


def test_a_refusal_names_the_identity_the_permission_and_the_name() -> None:
    who = Identity("svc", publish=("orders.*",))
    assert as_caller(who, Permission.PUBLISH, "billing.x") == (
        "identity 'svc' may not publish 'billing.x' (auth.identities.svc.publish)"
    )
    assert as_caller(who, Permission.SUBSCRIBE, "orders.x") == (
        "identity 'svc' may not subscribe 'orders.x' (auth.identities.svc.subscribe)"
    )
    assert as_caller(who, Permission.ADMIN) == "identity 'svc' lacks the admin permission"


def test_require_returns_the_caller_the_gate_set_and_reset_restores() -> None:
    who = Identity("svc", subscribe=("orders.*",))
    token = set_caller(who)
    try:
        assert caller() is who
        assert require(Permission.SUBSCRIBE, "orders.1") is who
    finally:
        reset_caller(token)
    assert caller() is not who


def test_outside_any_call_nothing_is_allowed() -> None:
    """A path the gate did not set a caller for fails closed."""
    assert caller() is not NOBODY
    for permission, name in ((Permission.PUBLISH, "q"), (Permission.SUBSCRIBE, "q")):
        with pytest.raises(PermissionDenied):
            require(permission, name)
    with pytest.raises(PermissionDenied):
        require(Permission.ADMIN)


def test_identities_are_built_from_their_configuration() -> None:
    config = IdentityConfig("svc", publish=("a.*",), subscribe=("b",), admin=True, publish_rate=5.0)
    identity = Access(AuthConfig(mode="off", identities=(config,))).identities["svc"]
    assert (identity.name, identity.publish, identity.subscribe) == ("svc", ("a.*",), ("b",))
    assert identity.admin and identity.publish_rate == 5.0


# config.toml: [auth], identities, [tls], secrets

GOOD_SHA = sha("a-token")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def loaded(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Any:
    return load(write(tmp_path, text), environ or {})


def error_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        loaded(tmp_path, text, environ)
    return str(caught.value)


def identity_toml(name: str = "svc", **keys: Any) -> str:
    lines = [f"[auth.identities.{name}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def test_identities_load_with_their_keys(tmp_path: Path) -> None:
    text = (
        '[auth]\nmode = "token"\n'
        + identity_toml(
            "orders-service",
            token_sha256=GOOD_SHA,
            certificate_subject="CN=orders-service",
            publish=["orders.*"],
            subscribe=["orders.*", "audit"],
            admin=True,
            publish_rate=10.5,
            publish_burst=20,
            max_waiting_pulls=3,
        )
        + identity_toml("reader", token_sha256=sha("other"))
    )
    auth = loaded(tmp_path, text).auth
    assert auth.mode == "token"
    orders, reader = auth.identities
    assert orders == IdentityConfig(
        "orders-service",
        token_sha256=GOOD_SHA,
        certificate_subject="CN=orders-service",
        publish=("orders.*",),
        subscribe=("orders.*", "audit"),
        admin=True,
        publish_rate=10.5,
        publish_burst=20,
        max_waiting_pulls=3,
    )
    assert (reader.publish, reader.subscribe, reader.admin) == ((), (), False)


def test_auth_is_off_by_default_and_the_mode_can_come_from_the_environment(
    tmp_path: Path,
) -> None:
    assert loaded(tmp_path, "").auth == AuthConfig()
    text = identity_toml(token_sha256=GOOD_SHA)
    assert loaded(tmp_path, text, {"EVENTBUS_AUTH__MODE": "token"}).auth.mode == "token"


def test_an_uppercase_token_hash_is_taken_as_its_lowercase(tmp_path: Path) -> None:
    text = '[auth]\nmode = "token"\n' + identity_toml(token_sha256=GOOD_SHA.upper())
    (identity,) = loaded(tmp_path, text).auth.identities
    assert identity.token_sha256 == GOOD_SHA
    checked = Access(loaded(tmp_path, text).auth)
    assert authenticate(checked, "Bearer a-token").name == "svc"


TOKEN_MODE = '[auth]\nmode = "token"\n'


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[auth]\nmode = "ldap"\n', 'auth.mode: expected one of off, token, mtls, any, got "ldap"'),
        (TOKEN_MODE, 'auth.mode: "token" needs at least one [auth.identities.NAME]'),
        (
            TOKEN_MODE + identity_toml(certificate_subject="CN=x"),
            'auth.mode: "token" needs an [auth.identities.NAME] with token_sha256: no caller '
            "could prove who it is",
        ),
        (
            '[auth]\nmode = "mtls"\n' + identity_toml(certificate_subject="CN=x"),
            'auth.mode: "mtls" needs tls.client_ca_file (client certificates are checked '
            "against it)",
        ),
        (
            '[auth]\nmode = "any"\n' + identity_toml(token_sha256=GOOD_SHA),
            'auth.mode: "any" needs tls.client_ca_file (client certificates are checked '
            "against it)",
        ),
        ("[auth]\nidentities = 3\n", "auth.identities: expected a table, got 3"),
        (
            '[auth.identities]\n"a b" = {}\n',
            'auth.identities."a b": expected a name of 1-64 of A-Z a-z 0-9 _ . -',
        ),
        ("[auth.identities]\nsvc = 1\n", 'auth.identities."svc": expected a table, got 1'),
        (
            identity_toml(token="plain"),
            'auth.identities."svc".token: unknown key',
        ),
        (
            identity_toml(name="svc"),  # fine alone; see the next cases for the keys
            None,
        ),
        (
            identity_toml(token_sha256="abc"),
            'auth.identities."svc".token_sha256: expected the hex SHA-256 of a token: 64 of '
            "0-9 a-f, got a string of 3 characters (not shown: it may be secret)",
        ),
        (
            identity_toml(token_sha256=sha("")),
            'auth.identities."svc".token_sha256: is the SHA-256 of an empty token; use a '
            "random token of its own",
        ),
        (
            identity_toml(publish="orders.*"),
            'auth.identities."svc".publish: expected a list of globs of queue and topic names, '
            'got "orders.*"',
        ),
        (
            identity_toml(subscribe=["orders.*", "bad!name"]),
            'auth.identities."svc".subscribe: expected a list of globs of queue and topic '
            'names, got ["orders.*", "bad!name"]',
        ),
        (
            identity_toml(subscribe=[""]),
            'auth.identities."svc".subscribe: expected a list of globs of queue and topic '
            'names, got [""]',
        ),
        (
            identity_toml(admin="yes"),
            'auth.identities."svc".admin: expected true or false, got "yes"',
        ),
        (
            identity_toml(certificate_subject="orders-service"),
            'auth.identities."svc".certificate_subject: expected a certificate subject of '
            'KEY=VALUE pairs, such as "CN=orders-service,O=Example" (a , + or \\ inside a '
            'value escaped with \\), got "orders-service"',
        ),
        (
            identity_toml("a", token_sha256=GOOD_SHA) + identity_toml("b", token_sha256=GOOD_SHA),
            "auth.identities.b.token_sha256: the same as a's; each identity needs its own",
        ),
        (
            identity_toml("a", token_sha256=GOOD_SHA)
            + identity_toml("b", token_sha256=GOOD_SHA.upper()),
            "auth.identities.b.token_sha256: the same as a's; each identity needs its own",
        ),
        (
            identity_toml("a", certificate_subject="CN=x,O=y")
            + identity_toml("b", certificate_subject="o=y, CN=x"),
            "auth.identities.b.certificate_subject: the same as a's; each identity needs its own",
        ),
    ],
)
def test_auth_mistakes_are_one_line_naming_the_key(
    tmp_path: Path, text: str, line: str | None
) -> None:
    if line is None:
        assert loaded(tmp_path, text).auth.identities[0].name == "svc"
    else:
        assert error_of(tmp_path, text) == f"config.toml: {line}"


def test_identities_come_from_the_file_only(tmp_path: Path) -> None:
    assert error_of(tmp_path, "", {"EVENTBUS_AUTH__IDENTITIES": "x"}) == (
        "EVENTBUS_AUTH__IDENTITIES: auth.identities: unknown key"
    )


def test_tls_keys_that_only_make_sense_together(tmp_path: Path) -> None:
    assert error_of(tmp_path, '[tls]\ncert_file = "/c.pem"\n') == (
        "config.toml: tls.cert_file: and tls.key_file must be set together"
    )
    assert error_of(tmp_path, '[tls]\nkey_file = "/k.pem"\n') == (
        "config.toml: tls.cert_file: and tls.key_file must be set together"
    )
    assert error_of(tmp_path, '[tls]\nclient_ca_file = "/ca.pem"\n') == (
        "config.toml: tls.client_ca_file: needs tls.cert_file and tls.key_file"
    )
    assert error_of(tmp_path, "[tls]\nhttp = true\n") == (
        "config.toml: tls.http: needs tls.cert_file and tls.key_file"
    )
    assert error_of(tmp_path, "[tls]\ncert_file = 3\n") == (
        "config.toml: tls.cert_file: expected a path to a PEM file, or empty, got 3"
    )


TLS = '[tls]\ncert_file = "c.pem"\nkey_file = "/abs/k.pem"\nclient_ca_file = "sub/ca.pem"\n'


def test_relative_tls_files_are_found_in_the_credentials_directory(tmp_path: Path) -> None:
    tls = loaded(tmp_path, TLS, {"CREDENTIALS_DIRECTORY": "/run/credentials/eventbus"}).tls
    assert tls.cert_file == "/run/credentials/eventbus/c.pem"
    assert tls.key_file == "/abs/k.pem"  # an absolute path stays as written
    assert tls.client_ca_file == "/run/credentials/eventbus/sub/ca.pem"
    assert loaded(tmp_path, TLS).tls.cert_file == "c.pem"  # without it, as written


def test_mtls_with_a_client_ca_loads(tmp_path: Path) -> None:
    text = TLS + '[auth]\nmode = "mtls"\n' + identity_toml(certificate_subject="CN=svc")
    config = loaded(tmp_path, text)
    assert config.auth.mode == "mtls" and config.tls.enabled


AMQP_URL = "amqps://user:s3cret@rabbit.example:5671/vhost"


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("amqp", "url", AMQP_URL),
        ("postgres", "dsn", "postgresql://app:s3cret@db.example/eventbus?sslmode=verify-full"),
        ("redis", "url", "rediss://:s3cret@cache.example:6380/0"),
    ],
)
def test_secrets_are_read_from_files(tmp_path: Path, section: str, key: str, value: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text(f"{value}\n")  # the newline an editor adds is dropped
    config = loaded(tmp_path, f'[{section}]\n{key}_file = "{secret}"\n')
    assert getattr(getattr(config, section), key) == value


def test_a_relative_secret_file_is_read_from_the_credentials_directory(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "amqp-url").write_text(AMQP_URL)
    environ = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert loaded(tmp_path, '[amqp]\nurl_file = "amqp-url"\n', environ).amqp.url == AMQP_URL
    via_env = {**environ, "EVENTBUS_AMQP__URL_FILE": "amqp-url"}
    assert loaded(tmp_path, "", via_env).amqp.url == AMQP_URL


def test_an_unreadable_secret_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    line = error_of(tmp_path, f'[postgres]\ndsn_file = "{missing}"\n')
    assert line.startswith(f"config.toml: postgres.dsn_file: cannot read {missing}: ")
    assert "No such file" in line and "\n" not in line


def test_a_secret_file_holding_something_else_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("http://user:s3cret@example\n")
    line = error_of(tmp_path, f'[amqp]\nurl_file = "{secret}"\n')
    assert line == (
        "config.toml: amqp.url_file: the file must hold an amqp:// URL with a host (a / # ? in "
        "the password %-encoded)"
    )
    assert "s3cret" not in line
    secret.write_bytes(b"\xff\xfe")
    assert "cannot read" in error_of(tmp_path, f'[amqp]\nurl_file = "{secret}"\n')


def test_an_admin_actions_target_is_cut_short_and_cannot_forge_a_log_line() -> None:
    from eventbus.security.access import target_of

    assert target_of("orders", ["a", "b"]) == "orders (2 message ids)"
    assert target_of("") == "every queue"
    assert target_of("q\nINFO forged\x1b[2J") == "q\\nINFO forged\\x1b[2J"
    assert target_of("q" * 70) == "q" * 64 + "... (70 characters)"
