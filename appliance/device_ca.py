"""The appliance's device signing key (the *device CA*): device certificates and block
grants for LAN peers (protocol/peers.py says what they are and how peers check them).

One Ed25519 key, made at `cairnd init` (or at the first start of a home older than it),
kept in HOME/secrets/ beside the URL key, so the copies of the home on the data disks and
`cairnd recover` carry it like every other secret (appliance/home_copies.py):

    HOME/secrets/device-ca.key    the private key, PKCS#8 PEM, 0600
    HOME/secrets/device-ca.pem    its self-signed CA certificate (10 years), 0600 like
                                  the rest of secrets/ (it is public: every device gets it)

Agents pin the CA certificate when they join and trust a peer only with a certificate it
signed; a lost key would force every device to join again, which is why it lives with the
secrets that recovery restores, and why a damaged pair stops the appliance with a clear
error instead of being silently replaced.

What it signs, all pure functions of the key and plain values (tests drive them without a
server):

- a device certificate (`sign_device_certificate`): subject CN = device id, O = the
  user's opaque tag, OU = appliance id; valid DEVICE_CERT_LIFETIME_S (backdated a few
  minutes for clock skew); digitalSignature; serverAuth + clientAuth, since a device is
  both the server and the client of its peers.
- block grants (`sign_grants`): one per GRANT_MAX_BLOCKS blocks, for a device's recorded
  certificate key, valid GRANT_LIFETIME_S.

The user tag (`user_tag`) names a user in certificates and grants without naming them: an
HMAC of the user's database id under a key derived from the CA key, so it is stable as long
as the CA is (a recovered home keeps both) and means nothing to anyone without the key.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import BadRequestError, ConfigError
from protocol.peers import (
    DEVICE_CERT_LIFETIME_S,
    GRANT_LIFETIME_S,
    Grant,
    chunk_blocks,
    sign_grant,
    spki_sha256,
)

log = logging.getLogger(__name__)

SECRETS_DIR = "secrets"
KEY_NAME = "device-ca.key"
CERTIFICATE_NAME = "device-ca.pem"
CA_VALIDITY = datetime.timedelta(days=3650)
CA_BACKDATE = datetime.timedelta(hours=1)
DEVICE_BACKDATE = datetime.timedelta(minutes=5)   # a peer whose clock is a little behind
USER_TAG_LABEL = b"cairn-user-tag-v1\x00"
USER_TAG_HEX = 16


@dataclass(frozen=True)
class DeviceCa:
    """The signing key and its CA certificate, loaded."""

    key: Ed25519PrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def tag_key(self) -> bytes:
        """The HMAC key of user tags: derived from the private key, never the key itself."""
        raw = self.key.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        return hashlib.sha256(b"cairn-user-tag-key-v1\x00" + raw).digest()


def _utc(now: float | None) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(
        now if now is not None else datetime.datetime.now(datetime.UTC).timestamp(),
        datetime.UTC)


def ca_common_name(appliance_id: str) -> str:
    return f"Cairn device CA {appliance_id[:8]}"


def make_ca_certificate(key: Ed25519PrivateKey, appliance_id: str,
                        now: float | None = None) -> x509.Certificate:
    """A self-signed CA certificate for KEY: it signs device certificates and nothing
    below them (path length 0)."""
    start = _utc(now)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, ca_common_name(appliance_id)),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, appliance_id),
    ])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CA_BACKDATE)
        .not_valid_after(start + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
                       critical=False)
        .sign(key, None)   # Ed25519 signs the whole message: no separate hash
    )


def make_device_ca(appliance_id: str, now: float | None = None) -> DeviceCa:
    key = Ed25519PrivateKey.generate()
    return DeviceCa(key, make_ca_certificate(key, appliance_id, now))


# --- files ------------------------------------------------------------------------------

def ca_paths(home: Path) -> tuple[Path, Path]:
    """(key, certificate) of HOME's device CA."""
    folder = home / SECRETS_DIR
    return folder / KEY_NAME, folder / CERTIFICATE_NAME


def _write_new(path: Path, data: bytes) -> None:
    """Write PATH 0600 from the start, durably (temp file, fsync, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_device_ca(home: Path, ca: DeviceCa) -> None:
    key_path, certificate_path = ca_paths(home)
    _write_new(key_path, ca.key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    _write_new(certificate_path, ca.certificate.public_bytes(serialization.Encoding.PEM))


def load_device_ca(home: Path) -> DeviceCa:
    """HOME's device CA. Raises ConfigError when a file is unreadable, damaged, or the
    certificate is not the key's."""
    key_path, certificate_path = ca_paths(home)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the device CA in {key_path.parent}: "
                          f"{exc.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"the device CA in {key_path.parent} is damaged: {exc}; restore "
                          "it from a copy of the home (`cairnd recover`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{key_path} is not an Ed25519 key")
    if certificate.public_key() != key.public_key():
        raise ConfigError(f"{certificate_path} is not the certificate of {key_path}")
    return DeviceCa(key, certificate)


def ensure_device_ca(home: Path, appliance_id: str) -> DeviceCa:
    """HOME's device CA, made first if the home has none (a home from before API 1.5).
    A key without its certificate gets a new certificate of the same key (devices pin the
    key's certificate, so they must join again only if the key is lost); a certificate
    without its key is an error: a new key would lock out every device."""
    key_path, certificate_path = ca_paths(home)
    has_key, has_certificate = key_path.exists(), certificate_path.exists()
    if not has_key and not has_certificate:
        ca = make_device_ca(appliance_id)
        write_device_ca(home, ca)
        log.info("made the device signing key (device CA) in %s", key_path.parent)
        return ca
    if not has_key:
        raise ConfigError(f"the device CA key {key_path} is missing (its certificate "
                          "exists); restore it from a copy of the home (`cairnd recover`), "
                          "or delete the certificate too to make a new one (every device "
                          "then has to join again to use LAN peers)")
    if not has_certificate:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{key_path} is not an Ed25519 key")
        log.warning("the device CA certificate was missing; made a new one for its key")
        _write_new(certificate_path, make_ca_certificate(key, appliance_id).public_bytes(
            serialization.Encoding.PEM))
    return load_device_ca(home)


# --- device certificates ------------------------------------------------------------------

def parse_device_key(pem: str) -> Ed25519PublicKey:
    """The Ed25519 public key PEM (SubjectPublicKeyInfo) holds. Raises BadRequestError for
    anything else: peers speak Ed25519 only."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BadRequestError("public_key is not a PEM public key (SubjectPublicKeyInfo)") \
            from None
    if not isinstance(key, Ed25519PublicKey):
        raise BadRequestError(f"public_key is {_key_kind(key)}; device keys must be "
                              "Ed25519 (peers refuse every other kind)")
    return key


def _key_kind(key: object) -> str:
    for kind, name in ((rsa.RSAPublicKey, "an RSA key"), (ec.EllipticCurvePublicKey,
                       "an elliptic-curve (ECDSA) key"), (Ed448PublicKey, "an Ed448 key")):
        if isinstance(key, kind):
            return name
    return "not an Ed25519 key"


def key_sha256(key: Ed25519PublicKey) -> str:
    """The hex SHA-256 of KEY's SubjectPublicKeyInfo: what grants are bound to."""
    return spki_sha256(key.public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo))


def user_tag(ca: DeviceCa, user_id: int) -> str:
    """The opaque, stable tag of a user in certificates and grants (never the name)."""
    mac = hmac.new(ca.tag_key, USER_TAG_LABEL + str(user_id).encode(), hashlib.sha256)
    return mac.hexdigest()[:USER_TAG_HEX]


@dataclass(frozen=True)
class DeviceSubject:
    """Who a device certificate names."""

    device_id: str
    user_tag: str
    appliance_id: str


def sign_device_certificate(ca: DeviceCa, key: Ed25519PublicKey, subject: DeviceSubject,
                            now: float | None = None) -> x509.Certificate:
    start = _utc(now)
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, subject.device_id),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject.user_tag),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject.appliance_id),
    ])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - DEVICE_BACKDATE)
        .not_valid_after(start + datetime.timedelta(seconds=DEVICE_CERT_LIFETIME_S))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
        .sign(ca.key, None)
    )


def certificate_expiry(certificate: x509.Certificate) -> int:
    return int(certificate.not_valid_after_utc.timestamp())


def issued_by(ca_certificate: x509.Certificate, certificate: x509.Certificate) -> bool:
    """Whether CERTIFICATE carries a valid signature of CA_CERTIFICATE's key."""
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# --- grants -------------------------------------------------------------------------------

@dataclass(frozen=True)
class GrantHolder:
    """The device a grant is for, as its current certificate names it."""

    device_id: str
    key_sha256: str
    user_tag: str


def sign_grants(ca: DeviceCa, appliance_id: str, holder: GrantHolder,
                block_ids: Iterable[str], now: float) -> list[str]:
    """Grants letting HOLDER read BLOCK_IDS from the user's peers, GRANT_MAX_BLOCKS each,
    valid GRANT_LIFETIME_S from NOW."""
    expires = int(now + GRANT_LIFETIME_S)
    return [sign_grant(ca.key, Grant(appliance_id=appliance_id, device_id=holder.device_id,
                                     key_sha256=holder.key_sha256, user_tag=holder.user_tag,
                                     expires_at=expires, blocks=frozenset(chunk)))
            for chunk in chunk_blocks(block_ids)]
