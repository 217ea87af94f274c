"""A local certificate authority and the servers' certificate, kept in the state folder.

`ensure_tls(directory, hosts)` makes sure `directory` holds:

    ca.crt      (0600 like the whole state folder, but public: hand it to devices and browsers)
    ca.key      (0600) the authority's private key: whoever holds it can impersonate any server
    server.crt  the brokers' and dashboards' certificate, signed by ca.crt, with a SAN for
                localhost, 127.0.0.1, ::1 and every configured host name
    server.key  (0600) its private key

Keys are ECDSA P-256. What is there is reused: the authority for ten years, the server
certificate until `RENEW_BEFORE` of its 397 days are left, or until the wanted host names
change, or the authority did; then a new key and certificate are issued (the
authority stays, so devices keep trusting the servers). Every file is written to a temporary
name with its final mode and renamed into place, so a broker or dashboard never reads half of one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TLS_DIR: Final = "tls"
CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.crt"
SERVER_KEY: Final = "server.key"
PRIVATE_MODE: Final = 0o600
# Names every server certificate carries: the local cluster is reached through these.
LOOPBACK_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
CA_LIFETIME: Final = datetime.timedelta(days=3650)
# The most browsers accept for a certificate of a public authority; kept for a local one too.
SERVER_LIFETIME: Final = datetime.timedelta(days=397)
RENEW_BEFORE: Final = datetime.timedelta(days=30)
# Certificates are valid from a little before now: a client whose clock is behind still accepts.
BACKDATE: Final = datetime.timedelta(minutes=5)
_DNS_NAME: Final = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


class TlsError(ValueError):
    """A host name that cannot go into a certificate, or unusable files in the TLS folder."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the authority and the server certificate are, and what this call changed."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    # "ca" and/or "server" when they were (re)issued by this call.
    issued: tuple[str, ...] = ()

    def client_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.ca_cert)


def normalize_hosts(hosts: Iterable[str]) -> tuple[str, ...]:
    """The loopback names, then each given host once: DNS names lower-cased, IP addresses in
    their canonical form; TlsError for anything else (a URL, a port, a space)."""
    result: list[str] = []
    for raw in (*LOOPBACK_HOSTS, *hosts):
        host = raw.strip().lower().strip("[]")
        if not host:
            continue
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if len(host) > 253 or not _DNS_NAME.match(host):
                raise TlsError(
                    f"TLS host {raw!r} is neither a DNS name nor an IP address"
                ) from None
        if host not in result:
            result.append(host)
    return tuple(result)


def split_hosts(text: str) -> tuple[str, ...]:
    """`a.example,b.example 10.0.0.5` -> the names (commas or spaces between them)."""
    return tuple(part for part in re.split(r"[,\s]+", text) if part)


def client_ssl_context(ca_file: Path | str) -> ssl.SSLContext:
    """A client context that trusts `ca_file` only, checks the host name, speaks TLS 1.2+."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(target: Path, content: bytes) -> None:
    descriptor, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    temporary = Path(name)
    try:
        os.fchmod(descriptor, PRIVATE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its key, or None if either is missing, unreadable or they differ."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != (
        key.public_key().public_numbers()
    ):
        return None
    return certificate, key


def _due(certificate: x509.Certificate, now: datetime.datetime) -> bool:
    return certificate.not_valid_after_utc - now < RENEW_BEFORE


def _issue_ca(
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teamtrack"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"teamtrack local CA {now:%Y-%m-%d %H%M%S}"),
    ])
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        # It signs server certificates only, never another authority.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _subject_alternative_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _issue_server(
    hosts: Sequence[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "teamtrack"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_LIFETIME, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(_subject_alternative_names(hosts)), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


def certificate_hosts(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses of a certificate's SAN, as strings."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    names = extension.value
    return (
        *names.get_values_for_type(x509.DNSName),
        *(str(address) for address in names.get_values_for_type(x509.IPAddress)),
    )


def _signed_by(certificate: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def ensure_tls(
    directory: Path | str,
    hosts: Iterable[str] = (),
    *,
    now: datetime.datetime | None = None,
    rotate: bool = False,
) -> TlsFiles:
    """The authority and a server certificate for `hosts` (plus the loopback names) in
    `directory`, reusing what is there and still good; `rotate` issues both afresh."""
    wanted = normalize_hosts(hosts)
    moment = now or _now()
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    paths = {name: folder / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    issued: list[str] = []

    ca = None if rotate else _load_pair(paths[CA_CERT], paths[CA_KEY])
    if ca is None or _due(ca[0], moment):
        ca = _issue_ca(moment)
        # The key first: a certificate whose key is missing is never left behind.
        _write_private(paths[CA_KEY], _key_bytes(ca[1]))
        _write_private(paths[CA_CERT], ca[0].public_bytes(serialization.Encoding.PEM))
        issued.append("ca")

    server = None if issued else _load_pair(paths[SERVER_CERT], paths[SERVER_KEY])
    if (
        server is None
        or _due(server[0], moment)
        or set(wanted) != set(certificate_hosts(server[0]))
        or not _signed_by(server[0], ca[0])
    ):
        server = _issue_server(wanted, ca, moment)
        _write_private(paths[SERVER_KEY], _key_bytes(server[1]))
        _write_private(paths[SERVER_CERT], server[0].public_bytes(serialization.Encoding.PEM))
        issued.append("server")
    return TlsFiles(
        directory=folder,
        ca_cert=paths[CA_CERT],
        ca_key=paths[CA_KEY],
        server_cert=paths[SERVER_CERT],
        server_key=paths[SERVER_KEY],
        hosts=certificate_hosts(server[0]),
        issued=tuple(issued),
    )
