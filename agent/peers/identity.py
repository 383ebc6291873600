"""This device's identity among its LAN peers: its own Ed25519 key, the certificate the
appliance signed for it, and the pinned device CA (protocol/peers.py says what they hold).

    HOME/device-key.pem    0600  the device's Ed25519 private key (PKCS#8); never leaves
    HOME/device-cert.pem   0600  its certificate: CN device id, O user tag, OU appliance id
    HOME/device-ca.pem     0600  the appliance's device CA, pinned at the first issue

Why its own key and not the bearer token: a peer must prove who it is to another peer
without handing over anything that would let that peer act as it against the appliance.
Mutual TLS with certificates only the appliance can sign does that, and binds each block
grant to the key that presented it.

Why the CA is pinned at the first issue (and a later, different one refused): the
appliance's TLS certificate is pinned at join, so the CA comes over a channel we already
trust; but if the appliance (or whoever took it over) later swapped the CA, every device
would silently start trusting certificates nobody vetted. A swap is logged and refused, as
a changed user key is (agent.home.pin_public_key).

Renewal: certificates live DEVICE_CERT_LIFETIME_S; a device asks for a new one once less
than half its life is left (`needs_renewal`), at join, at the start of `cairn sync` and
`cairn mount`, and from the peer service's `keep_identity_fresh` loop. Nothing here may
stop join, sync or mount: `try_ensure_identity` logs one line and answers None (peers off).

The TLS contexts trust the pinned CA and nothing else (no system roots): a peer's
certificate from another appliance, a self-signed one or an expired one fails the
handshake. Host names are not checked (peers are found by address); who the peer is
comes from its certificate (`certified_device`) after the handshake, and the peer service
checks the user tag and the revocation list itself.
"""

from __future__ import annotations

import logging
import os
import secrets
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from agent.api import Api
from agent.errors import CairnAgentError, PeerError
from agent.home import AgentHome, write_private
from protocol import version
from protocol.models import DeviceCertificate
from protocol.peers import spki_sha256

log = logging.getLogger("cairn.peers")

KEY_FILE = "device-key.pem"
CERT_FILE = "device-cert.pem"
CA_FILE = "device-ca.pem"
RENEW_RETRY_S = 600.0        # after a failed renewal, ask again this much later
RENEW_CHECK_MAX_S = 3600.0   # and look at the clock at least this often (suspend, jumps)
IDENTITY_AT_START_S = 10.0   # join, sync and mount wait at most this for a certificate


@dataclass(frozen=True)
class CertifiedDevice:
    """What a device certificate says (after TLS or `verify_certificate` checked it)."""

    device_id: str
    user_tag: str
    appliance_id: str
    key_sha256: str          # SHA-256 of the certificate's public key (SPKI DER), hex
    expires_at: int


def _name(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise PeerError(f"a device certificate without exactly one {label}")
    return values[0].value


def _public_der(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def _describe(cert: x509.Certificate) -> CertifiedDevice:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise PeerError("a device certificate whose key is not Ed25519")
    return CertifiedDevice(device_id=_name(cert, NameOID.COMMON_NAME, "CN"),
                           user_tag=_name(cert, NameOID.ORGANIZATION_NAME, "O"),
                           appliance_id=_name(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "OU"),
                           key_sha256=spki_sha256(_public_der(key)),
                           expires_at=int(cert.not_valid_after_utc.timestamp()))


def certified_device(cert_der: bytes) -> CertifiedDevice:
    """What the certificate CERT_DER (DER, as `getpeercert(binary_form=True)` gives it)
    says. It does not check the signature: call it after TLS verified the chain. Raises
    PeerError if it cannot be read or lacks a field."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise PeerError("a peer certificate that cannot be read") from None
    return _describe(cert)


def _load_pem_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise PeerError(f"{what} is not a PEM certificate") from None


def _lifetime(cert: x509.Certificate) -> tuple[float, float]:
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def needs_renewal(certificate_pem: bytes, now: float) -> bool:
    """Whether a certificate has less than half its life left (or is not valid yet:
    a clock that jumped back is not trusted to tell)."""
    start, end = _lifetime(_load_pem_cert(certificate_pem, "the device certificate"))
    return not start <= now < end - (end - start) / 2


def renewal_due_at(certificate_pem: bytes) -> float:
    """When a certificate reaches half its life: when `needs_renewal` turns True."""
    start, end = _lifetime(_load_pem_cert(certificate_pem, "the device certificate"))
    return end - (end - start) / 2


def verify_certificate(certificate_pem: bytes, ca_certificate_pem: bytes,
                       key: Ed25519PrivateKey, now: float) -> CertifiedDevice:
    """What CERTIFICATE_PEM says, once it is checked: signed by the CA, for KEY, and
    valid at NOW. Raises PeerError otherwise (the appliance's answer is not trusted
    blindly: a certificate for another key would make every handshake fail later,
    far from the cause)."""
    cert = _load_pem_cert(certificate_pem, "the device certificate")
    ca = _load_pem_cert(ca_certificate_pem, "the device CA")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PeerError("the device certificate is not signed by the device CA") from None
    cert_key = cert.public_key()
    if not isinstance(cert_key, Ed25519PublicKey) or _public_der(cert_key) != _public_der(key):
        raise PeerError("the device certificate is for another key than this device's")
    start, end = _lifetime(cert)
    if not start - 300 <= now < end:   # a few minutes of clock skew on the issuing side
        raise PeerError("the device certificate is not valid now (check the clock)")
    return _describe(cert)


@contextmanager
def _pem_file(data: bytes) -> Iterator[str]:
    """A path holding DATA for as long as the block runs: ssl's load_cert_chain reads
    files only. An anonymous memory file where there is one, so the private key never
    touches a disk twice; else a private temporary file, removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cairn-peer-pem", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="cairn-peer-") as folder:
        path = Path(folder) / "pem"
        write_private(path, data)
        yield str(path)


@dataclass(frozen=True)
class PeerIdentity:
    """This device among peers: its certificate (`me`), key, and the pinned CA."""

    me: CertifiedDevice
    key_pem: bytes
    certificate_pem: bytes
    ca_certificate_pem: bytes

    def ca_public_key(self) -> Ed25519PublicKey:
        """The device signing key's public half: it verifies block grants."""
        key = _load_pem_cert(self.ca_certificate_pem, "the device CA").public_key()
        if not isinstance(key, Ed25519PublicKey):
            raise PeerError("the device CA's key is not Ed25519")
        return key

    def _context(self, purpose: int) -> ssl.SSLContext:
        # A bare context: no system roots, only the pinned CA below.
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca_certificate_pem.decode())
        with _pem_file(self.certificate_pem) as cert, _pem_file(self.key_pem) as key:
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                raise PeerError(f"cannot use the device certificate: {exc}") from None
        return context

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 serving as this device; a client must present a certificate the
        pinned CA signed (CERT_REQUIRED), or the handshake fails."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 connecting as this device; the server's certificate must be one the
        pinned CA signed. No host name check: peers are reached by address, and who
        they are is read from the certificate afterwards."""
        context = self._context(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED   # check_hostname=False leaves it; be sure
        return context


# --- files in HOME ----------------------------------------------------------------------


def _read(home: AgentHome, name: str) -> bytes | None:
    try:
        return (home.path / name).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PeerError(f"cannot read {home.path / name}: {exc.strerror}") from None


def device_key(home: AgentHome) -> Ed25519PrivateKey:
    """HOME's device key, made (Ed25519, 0600) if there is none yet."""
    pem = _read(home, KEY_FILE)
    if pem is not None:
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise PeerError(f"{home.path / KEY_FILE} is damaged; remove it and its "
                            f"{CERT_FILE} to make a new device key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise PeerError(f"{home.path / KEY_FILE} is not an Ed25519 key")
        return key
    home.ensure()
    _create_once(home.path / KEY_FILE, _key_pem(Ed25519PrivateKey.generate()))
    return device_key(home)


def _create_once(path: Path, data: bytes) -> None:
    """PATH with DATA unless it exists already. A `cairn sync` and a `cairn mount` of one
    home starting at once must not each make a key and ask a certificate for it (the
    appliance binds grants to the newest): the first link wins, the other reads it."""
    spare = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    write_private(spare, data)
    try:
        os.link(spare, path)
    except FileExistsError:
        pass
    finally:
        spare.unlink()


def _key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PrivateKey) -> str:
    """KEY's public half as the API wants it (PEM SubjectPublicKeyInfo)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_identity(home: AgentHome, now: float | None = None) -> PeerIdentity | None:
    """HOME's identity as it is on disk, or None: no key, certificate or CA yet, or a
    certificate that does not match them or has expired. No request is made. Raises
    PeerError only for a file that exists but cannot be read."""
    key_pem, cert_pem, ca_pem = (_read(home, name) for name in (KEY_FILE, CERT_FILE, CA_FILE))
    if key_pem is None or cert_pem is None or ca_pem is None:
        return None
    try:
        me = verify_certificate(cert_pem, ca_pem, device_key(home),
                                time.time() if now is None else now)
    except PeerError as exc:
        log.debug("no usable device certificate: %s", exc.message)
        return None
    return PeerIdentity(me=me, key_pem=key_pem, certificate_pem=cert_pem,
                        ca_certificate_pem=ca_pem)


def save_certificate(home: AgentHome, answer: DeviceCertificate, *, device_id: str,
                     appliance_id: str, now: float | None = None) -> PeerIdentity:
    """Check ANSWER (a certificate the appliance issued for HOME's device key) and keep
    it. The CA is pinned the first time; an answer with another CA is refused (PeerError)
    and nothing is written. Used by `ensure_identity` and by a device admitted on the
    LAN (its AdmitResult carries its first certificate)."""
    key = device_key(home)
    cert_pem, ca_pem = answer.certificate.encode(), answer.ca_certificate.encode()
    pinned = _read(home, CA_FILE)
    if pinned is not None and _cert_der(pinned) != _cert_der(ca_pem):
        raise PeerError(f"the appliance's device CA changed since this device pinned it "
                        f"({home.path / CA_FILE}): refusing the new certificate. If the "
                        "appliance was really rebuilt, join this device again")
    me = verify_certificate(cert_pem, ca_pem, key, time.time() if now is None else now)
    if me.device_id != device_id or me.appliance_id != appliance_id:
        raise PeerError("the device certificate names another device or appliance "
                        f"({me.device_id} of {me.appliance_id})")
    if pinned is None:
        write_private(home.path / CA_FILE, ca_pem)
    write_private(home.path / CERT_FILE, cert_pem)
    return PeerIdentity(me=me, key_pem=_key_pem(key), certificate_pem=cert_pem,
                        ca_certificate_pem=pinned or ca_pem)


def _cert_der(pem: bytes) -> bytes:
    return _load_pem_cert(pem, "a device CA").public_bytes(serialization.Encoding.DER)


# --- asking the appliance ---------------------------------------------------------------


async def ensure_identity(api: Api, home: AgentHome, *, now: float | None = None
                          ) -> PeerIdentity | None:
    """HOME's identity, with a certificate that has at least half its life left: the one
    on disk, or a new one the appliance signs now (the device key is made first if
    missing). None if the appliance is older than API 1.5 (it signs nothing; peers stay
    off). Raises PeerError (a changed CA, a bad answer) or the API's errors."""
    clock = time.time() if now is None else now
    current = load_identity(home, clock)
    if current is not None and not needs_renewal(current.certificate_pem, clock):
        return current
    if api.connection.api_version is None:
        await api.health()         # learn the appliance's version
    if not api.supports(version.PEERS):
        log.debug("the appliance speaks API %s: no device certificates (peers off)",
                  api.connection.api_version)
        return None
    device = home.load_device()
    answer = await api.device_certificate(public_key_pem(device_key(home)))
    identity = save_certificate(home, answer, device_id=device.device_id,
                                appliance_id=device.appliance_id, now=clock)
    log.info("device certificate %s until %s", "renewed" if current else "issued",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(identity.me.expires_at)))
    return identity


async def try_ensure_identity(api: Api, home: AgentHome, *,
                              within_s: float = IDENTITY_AT_START_S) -> PeerIdentity | None:
    """`ensure_identity` for join, sync and mount, which must go on without peers: any
    failure is one logged line and None, and it gives up after WITHIN_S (an appliance
    that is away costs retries; a mount works offline and must not wait for them —
    `keep_identity_fresh` asks again later)."""
    with trio.move_on_after(within_s):
        try:
            return await ensure_identity(api, home)
        except CairnAgentError as exc:
            log.warning("no device certificate, peers off for now: %s", exc.message)
            return None
    log.warning("no device certificate, peers off for now: the appliance did not answer "
                "within %.0f s", within_s)
    return None


async def keep_identity_fresh(api: Api, home: AgentHome,
                              on_new: Callable[[PeerIdentity], None], *,
                              clock: Callable[[], float] = time.time,
                              check_every_s: float = RENEW_CHECK_MAX_S) -> None:
    """Renew HOME's certificate whenever half its life is gone, forever (the peer
    service runs this in its nursery); ON_NEW gets each new identity, to serve and
    connect with from then on (the one on disk at the start is not announced: the
    caller loaded it). A failure is logged and tried again RENEW_RETRY_S later; an
    appliance older than API 1.5 is asked again as rarely (it may be upgraded). CLOCK
    is the wall clock, looked at least every CHECK_EVERY_S (tests move it ahead)."""
    known = load_identity(home, clock())
    while True:
        due = renewal_due_at(known.certificate_pem) if known is not None else clock()
        wait = due - clock()
        if wait > 0:
            await trio.sleep(min(wait, check_every_s))
            continue
        try:
            fresh = await ensure_identity(api, home, now=clock())
        except CairnAgentError as exc:
            log.warning("cannot renew the device certificate (trying again in %.0f s): "
                        "%s", RENEW_RETRY_S, exc.message)
            fresh = None
        if fresh is not None and (known is None
                                  or fresh.certificate_pem != known.certificate_pem):
            known = fresh
            on_new(fresh)
        if fresh is None or needs_renewal(fresh.certificate_pem, clock()):
            await trio.sleep(RENEW_RETRY_S)
