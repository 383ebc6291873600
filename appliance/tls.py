"""The appliance's self-signed TLS certificate.

TLS is always on. Devices do not trust the certificate through a CA: an enrollment code
carries the certificate's SHA-256 fingerprint and the agent pins it. So the certificate only
has to be stable and to name the addresses clients use — it lives 10 years, uses ECDSA P-256
(small, fast handshakes, supported everywhere), and lists localhost, 127.0.0.1, ::1, the
configured listen host and the machine's hostname as subject alternative names.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import ConfigError

VALIDITY = datetime.timedelta(days=3650)
# Backdate a little so a device whose clock is slightly behind still accepts it.
CLOCK_SKEW = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class SelfSignedCertificate:
    certificate_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.certificate_pem)


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        name = name.strip().strip("[]")
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            entries.append(x509.DNSName(name.lower()))
        else:
            if not address.is_unspecified:  # 0.0.0.0 / :: name no host a client dials
                entries.append(x509.IPAddress(address))
    return entries


def subject_alternative_names(listen_host: str | None = None) -> list[str]:
    """The names the certificate is valid for, in the order written."""
    names = ["localhost", "127.0.0.1", "::1"]
    if listen_host:
        names.append(listen_host)
    hostname = socket.gethostname()
    if hostname:
        names.append(hostname)
    return names


def make_self_signed_certificate(
    names: Iterable[str], *, common_name: str = "Cairn appliance",
    now: datetime.datetime | None = None,
) -> SelfSignedCertificate:
    """A fresh P-256 key and a certificate for `names` (DNS names or IP addresses)."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Cairn"),
    ])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        # A CA:TRUE self-signed certificate so that clients (httpx, ssl) can be handed it
        # as their only trust anchor; path length 0 means it can sign nothing else.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Python 3.13+ verifies in X.509 strict mode, which wants this even when self-signed.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def certificate_fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex (what agents pin)."""
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"not a PEM certificate: {exc}") from None
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def read_certificate_fingerprint(path: Path) -> str:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS certificate {path}: {exc.strerror}") from None
    try:
        return certificate_fingerprint(pem)
    except ConfigError as exc:
        raise ConfigError(f"TLS certificate {path}: {exc.message}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (never briefly world-readable), durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_self_signed_certificate(certificate_path: Path, key_path: Path,
                                  listen_host: str | None = None) -> str:
    """Make a key and certificate, write them (key 0600, certificate 0644), return the
    certificate's fingerprint."""
    made = make_self_signed_certificate(subject_alternative_names(listen_host))
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(key_path, made.key_pem, 0o600)
    _write_new(certificate_path, made.certificate_pem, 0o644)
    return made.fingerprint


def ensure_certificate(certificate_path: Path, key_path: Path,
                       listen_host: str | None = None) -> str:
    """The fingerprint of the configured certificate, making one first if neither file
    exists (the "made at first start" case). One file without the other is an error."""
    has_certificate, has_key = certificate_path.exists(), key_path.exists()
    if not has_certificate and not has_key:
        return write_self_signed_certificate(certificate_path, key_path, listen_host)
    if not has_key:
        raise ConfigError(f"TLS key {key_path} is missing (the certificate exists); restore "
                          "it, or delete the certificate too to make a new pair")
    if not has_certificate:
        raise ConfigError(f"TLS certificate {certificate_path} is missing (the key exists); "
                          "restore it, or delete the key too to make a new pair")
    return read_certificate_fingerprint(certificate_path)
