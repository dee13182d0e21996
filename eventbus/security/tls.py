"""TLS on the gRPC port: the server's SSL context, built from [tls], and renewed on reload.

The listening socket keeps one context for its whole life. Its sni_callback, which OpenSSL calls
for every ClientHello (with or without a server name), hands the new connection the context
built from the latest files, so a reload changes what new handshakes see (certificate, key,
client CA) and leaves the connections already open as they are.
"""

from __future__ import annotations

import logging
import ssl

from ..config import TlsConfig
from ..errors import FatalError

logger = logging.getLogger(__name__)

ALPN = ["h2"]  # gRPC is HTTP/2; grpcio and grpc-go refuse a server that does not say so


class TlsError(FatalError):
    """A [tls] file cannot be read or used; the message names the key and the file."""


def client_verification(tls: TlsConfig, auth_mode: str) -> ssl.VerifyMode:
    """Whether clients must present a certificate signed by tls.client_ca_file (mode "mtls"),
    may present one (any other mode: one sent must still chain to the CA), or are not asked."""
    if not tls.client_ca_file:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if auth_mode == "mtls" else ssl.CERT_OPTIONAL


def server_context(tls: TlsConfig, auth_mode: str) -> ssl.SSLContext:
    """A server context from the [tls] files: TLS 1.2 or later with the standard library's
    defaults, ALPN h2, client certificates checked as client_verification says."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    # No session resumption: a resumed session skips the client certificate check, so one
    # from before a reload would outlive a client CA or certificate taken away by it.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    _load_chain(context, tls)
    if tls.client_ca_file:
        _load_client_ca(context, tls.client_ca_file)
    context.verify_mode = client_verification(tls, auth_mode)
    return context


def _load_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    _readable("tls.cert_file", tls.cert_file)
    _readable("tls.key_file", tls.key_file)
    _check_certificates("tls.cert_file", tls.cert_file)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(
                f"tls.key_file: {tls.key_file} is not the key of tls.cert_file {tls.cert_file}"
            ) from None
        raise TlsError(f"tls.key_file: {tls.key_file} holds no usable PEM private key") from None


def _load_client_ca(context: ssl.SSLContext, path: str) -> None:
    _readable("tls.client_ca_file", path)
    _check_certificates("tls.client_ca_file", path)
    context.load_verify_locations(cafile=path)


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise TlsError(f"{key}: cannot read {path}: {error.strerror}") from None


def _check_certificates(key: str, path: str) -> None:
    """path holds PEM certificates OpenSSL can read (checked on a throwaway context)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError):
        raise TlsError(f"{key}: {path} holds no valid PEM certificate") from None


def _no_password() -> bytes:
    raise TlsError("tls.key_file: the key is encrypted; give it unencrypted (see LoadCredential=)")


class ServerTls:
    """The listening context (context) and the one new connections get, renewed by reload."""

    def __init__(self, tls: TlsConfig, auth_mode: str) -> None:
        self.context = self._current = server_context(tls, auth_mode)
        self.context.sni_callback = self._assign

    def reload(self, tls: TlsConfig, auth_mode: str) -> None:
        """Read the files again; new handshakes use them, open connections keep theirs. Files
        that cannot be used raise TlsError and the running context stays."""
        fresh = server_context(tls, auth_mode)
        # OpenSSL copies the verify mode when a connection is created, not when its context
        # is swapped: the listening context carries it.
        self.context.verify_mode = fresh.verify_mode
        self._current = fresh
        logger.info("tls: certificates reloaded from %s", tls.cert_file)

    def _assign(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        if connection.context is not self._current:
            connection.context = self._current
