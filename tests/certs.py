"""Certificates for tests: a CA, and server and client certificates it signs, as PEM files.

    ca = make_ca(tmp_path, "test CA")
    server = issue(ca, "localhost")                     # valid for localhost and 127.0.0.1
    client = issue(ca, "orders-service", client=True)   # subject CN=orders-service
    server.cert_file, server.key_file, ca.cert_file     # paths; .cert_pem, .key_pem: bytes

Keys are EC P-256, quick to make. Files go in the CA's directory, named after the subject.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1")
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, in memory and as PEM files."""

    name: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_file: Path
    key_file: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert_file.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key_file.read_bytes()

    @property
    def directory(self) -> Path:
        return self.cert_file.parent


def make_ca(directory: Path, name: str = "eventbus test CA") -> Issued:
    """A self-signed CA, written as DIRECTORY/NAME.crt and NAME.key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    builder = (
        _builder(subject, subject, key.public_key(), _now() + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _write(directory, name, builder.sign(key, hashes.SHA256()), key)


def issue(
    ca: Issued,
    subject_cn: str,
    *,
    server_names: Sequence[str] = SERVER_NAMES,
    not_after: datetime.datetime | None = None,
    client: bool = False,
) -> Issued:
    """A certificate CA signs: for a server (names in subjectAltName, DNS or IP) or, with
    client=True, for a client (subject CN=SUBJECT_CN). not_after in the past: expired."""
    key = ec.generate_private_key(ec.SECP256R1())
    expires = not_after or _now() + 30 * DAY
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(_name(subject_cn), ca.certificate.subject, key.public_key(), expires)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if not client:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False
        )
    certificate = builder.sign(ca.key, hashes.SHA256())
    return _write(ca.directory, f"{subject_cn}-{certificate.serial_number:x}", certificate, key)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    expires: datetime.datetime,
) -> x509.CertificateBuilder:
    starts = min(_now(), expires) - DAY
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(starts)
        .not_valid_after(expires)
    )


def _usage(*, cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write(
    directory: Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    stem = name.replace(" ", "_").replace("/", "_")
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return Issued(name, certificate, key, cert_file, key_file)
