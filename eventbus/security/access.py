"""Identities and what each may do.

Every call passes the gate, which asks Access who the caller is (a bearer token, a client
certificate's subject, or nobody when auth.mode is "off") and keeps the answer for the call in a
context variable; the services then ask `require(permission, name)` before they look anything up,
so a refusal never tells whether a queue exists. Access is rebuilt from the configuration on
reload and swapped in whole.
"""

from __future__ import annotations

import contextvars
import enum
import fnmatch
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import (
    ATTRIBUTE_NAMES,
    AuthConfig,
    IdentityConfig,
    SubjectKey,
    parse_subject,
    subject_key,
)
from ..errors import CallError, PermissionDenied, Unauthenticated

BEARER = "bearer "
MAX_TOKEN_BYTES = 4096  # longer authorization values are refused before any hashing


class Permission(enum.Enum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"  # subscribe, pull, ack, nack, modify deadlines
    ADMIN = "admin"


@dataclass(frozen=True, eq=False)
class Identity:
    """A caller the configuration names, with its permissions and quotas."""

    name: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    admin: bool = False
    publish_rate: float = 0.0
    publish_burst: int = 0
    max_waiting_pulls: int = 0
    _patterns: dict[Permission, re.Pattern[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for permission, globs in (
            (Permission.PUBLISH, self.publish),
            (Permission.SUBSCRIBE, self.subscribe),
        ):
            self._patterns[permission] = _one_pattern(globs)

    @classmethod
    def of(cls, config: IdentityConfig) -> Identity:
        return cls(
            config.name,
            config.publish,
            config.subscribe,
            config.admin,
            config.publish_rate,
            config.publish_burst,
            config.max_waiting_pulls,
        )

    def may(self, permission: Permission, name: str = "") -> bool:
        if permission is Permission.ADMIN:
            return self.admin
        return self._patterns[permission].fullmatch(name) is not None


def _one_pattern(globs: Iterable[str]) -> re.Pattern[str]:
    """One regular expression matching what any of globs matches (fnmatch rules, case-sensitive)."""
    parts = [fnmatch.translate(glob) for glob in globs]
    return re.compile("|".join(f"(?:{part})" for part in parts) if parts else r"(?!)")


# auth.mode "off": every caller is this one, allowed everything, as before authentication existed.
NOBODY = Identity("", publish=("*",), subscribe=("*",), admin=True)
# Whoever asks outside a call the gate admitted: allowed nothing, so a path that escaped the
# gate fails closed instead of acting for nobody in particular.
OUTSIDER = Identity("")

_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("caller", default=OUTSIDER)


def caller() -> Identity:
    """The identity of the call being handled (the gate set it)."""
    return _caller.get()


def set_caller(identity: Identity) -> contextvars.Token[Identity]:
    return _caller.set(identity)


def reset_caller(token: contextvars.Token[Identity]) -> None:
    _caller.reset(token)


def require(permission: Permission, name: str = "") -> Identity:
    """The caller, if it may do permission on name; else PermissionDenied naming both."""
    identity = _caller.get()
    if identity.may(permission, name):
        return identity
    if permission is Permission.ADMIN:
        raise PermissionDenied(f"identity {identity.name!r} lacks the admin permission")
    raise PermissionDenied(
        f"identity {identity.name!r} may not {permission.value} {_shown(name)} "
        f"(auth.identities.{identity.name}.{permission.value})"
    )


SHOWN_NAME = 64  # characters of a refused name repeated in the answer and the log


def target_of(queue: str, ids: Sequence[str] = ()) -> str:
    """What an admin action acts on, for its log line (and its rate limit's kind): a name
    checked only later, so cut short like a refusal's, a control character in it escaped (a
    newline must not start a forged log line)."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in queue[:SHOWN_NAME])
    if len(queue) > SHOWN_NAME:
        shown = f"{shown}... ({len(queue)} characters)"
    what = shown or "every queue"
    return f"{what} ({len(ids)} message ids)" if ids else what


def _shown(name: str) -> str:
    """A name as a refusal repeats it: checked before validation, it may be any length."""
    if len(name) <= SHOWN_NAME:
        return repr(name)
    return f"{name[:SHOWN_NAME]!r}... ({len(name)} characters)"


class Access:
    """Tells callers apart by token or certificate, as auth.mode allows."""

    def __init__(self, config: AuthConfig) -> None:
        self.mode = config.mode
        identities = [(Identity.of(c), c) for c in config.identities]
        self.identities = {identity.name: identity for identity, _ in identities}
        self._tokens = [
            (bytes.fromhex(c.token_sha256), identity)
            for identity, c in identities
            if c.token_sha256
        ]
        self._subjects = {
            parse_subject(c.certificate_subject): identity
            for identity, c in identities
            if c.certificate_subject
        }

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def refusal(self, name: str, queue: str, topic: str = "") -> CallError | None:
        """Why the identity named name may no longer read queue (bound to topic), if it may
        not: what a reload does to a stream opened before it."""
        if not self.enabled:
            return None
        identity = self.identities.get(name)
        if identity is None:
            return Unauthenticated(f"identity {name!r} was removed by a reload")
        for target in (queue, topic):
            if target and not identity.may(Permission.SUBSCRIBE, target):
                return PermissionDenied(
                    f"identity {name!r} may no longer subscribe to {target[:64]!r} (reload)"
                )
        return None

    def authenticate(
        self, metadata: Mapping[str, Any], certificate: dict[str, Any] | None
    ) -> Identity:
        """The caller's identity; Unauthenticated when it brings no credentials this mode takes,
        or ones no identity holds. A token, when sent, decides (mode "any" too)."""
        if self.mode == "off":
            return NOBODY
        authorization = metadata.get("authorization")
        if authorization is not None and self.mode in ("token", "any"):
            return self._by_token(authorization)
        if certificate and self.mode in ("mtls", "any"):
            return self._by_certificate(certificate)
        wanted = {"token": "a bearer token", "mtls": "a client certificate"}.get(
            self.mode, "a bearer token or a client certificate"
        )
        raise Unauthenticated(f"this server needs {wanted}")

    def _by_token(self, authorization: Any) -> Identity:
        if not isinstance(authorization, str) or len(authorization) > MAX_TOKEN_BYTES:
            raise Unauthenticated("malformed authorization metadata")
        if not authorization[: len(BEARER)].lower() == BEARER:
            raise Unauthenticated('authorization metadata must be "Bearer <token>"')
        token = authorization[len(BEARER) :].strip()
        if not token:
            raise Unauthenticated("empty bearer token")
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, identity in self._tokens:  # every one compared: the time tells nothing
            if hmac.compare_digest(stored, digest):
                found = identity
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def _by_certificate(self, certificate: dict[str, Any]) -> Identity:
        identity = self._subjects.get(certificate_key(certificate))
        if identity is None:
            subject = subject_of(certificate)
            raise Unauthenticated(f"no identity has the certificate subject {subject!r}")
        return identity


def _attributes(certificate: dict[str, Any]) -> list[tuple[str, str]]:
    """A peer certificate's subject attributes (ssl.getpeercert()), in its order."""
    return [
        (key, value)
        for relative_name in certificate.get("subject", ())
        for key, value in relative_name
    ]


def certificate_key(certificate: dict[str, Any]) -> SubjectKey:
    """A peer certificate's subject as compared with certificate_subject: taken from the
    certificate's attributes themselves, so a value holding "," or "=" stays one value."""
    return subject_key(_attributes(certificate))


def subject_of(certificate: dict[str, Any]) -> str:
    """A peer certificate's subject as RFC 4514 text, "CN=name,O=org", in its order, short
    names where RFC 4514 has them (for log lines and refusals)."""
    return ",".join(
        f"{ATTRIBUTE_NAMES.get(key, key)}={_escaped(value)}"
        for key, value in _attributes(certificate)
    )


def _escaped(value: str) -> str:
    """value with the characters RFC 4514 escapes escaped."""
    escaped = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" "):
        escaped = escaped[:-1] + "\\ "
    return escaped
