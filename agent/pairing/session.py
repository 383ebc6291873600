"""The new device's request and what it accepts (pure): the first hello, the approver's
certificate on each later connection, the approval's certificates, expiry and aborts.

    waiting ──hello──▶ greeted ──approve (mutual TLS, hello's key)──▶ approving ──▶ joined
       │                  │                                              └──▶ failed
       └──────────────────┴──abort──▶ aborted          (any state but the last three:
                                                         expired once past expires_at)

Only the first hello counts: it fixes the approver's key and the device CA, and so the
code this device shows. A second hello with another certificate is refused (409); the same
certificate again gets the same answer (a retry after a lost answer). From the hello on,
only a connection whose client certificate has the hello's key and is signed by the
hello's CA may approve (the endpoint asks every new connection for a certificate of that
CA; `check_approver` checks again). Anyone on the LAN may abort: that only ends the request
early, which a device saying hello first could do as well.

The session never touches the network or a file: request.py holds the lock around it and
does the I/O its answers call for.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent.errors import PeerError
from agent.peers.identity import CertifiedDevice, certified_device, verify_certificate
from protocol.pairing import JoinApproval, JoinHello, JoinRequestInfo, expired, pairing_code

CLOCK_SKEW_S = 300


class State(Enum):
    WAITING = "waiting"
    GREETED = "greeted"
    APPROVING = "approving"
    JOINED = "joined"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Refusal:
    """An answer other than yes: the HTTP status and the message for the other side."""

    status: int
    message: str


@dataclass(frozen=True)
class Greeting:
    """What the first hello fixed."""

    appliance_id: str
    ca_pem: str
    approver_key_der: bytes      # SPKI DER of the hello's device certificate's key
    approver: CertifiedDevice
    code: str


def spki_der(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _certificate(pem: str, what: str) -> x509.Certificate | Refusal:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        return Refusal(400, f"{what} is not a PEM certificate")


def _ed25519(cert: x509.Certificate, what: str) -> Ed25519PublicKey | Refusal:
    key = cert.public_key()
    return key if isinstance(key, Ed25519PublicKey) else Refusal(400, f"{what}'s key is "
                                                                       "not Ed25519")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _valid_at(cert: x509.Certificate, now: float) -> bool:
    return (cert.not_valid_before_utc.timestamp() - CLOCK_SKEW_S <= now
            < cert.not_valid_after_utc.timestamp())


class JoinSession:
    """One `cairn join --lan` request. Not thread-safe: the caller holds a lock."""

    def __init__(self, info: JoinRequestInfo, device_key: Ed25519PrivateKey,
                 wrap_public: bytes) -> None:
        self.info = info
        self.device_key = device_key
        self.device_key_der = spki_der(device_key.public_key())
        self.wrap_public = wrap_public
        self.state = State.WAITING
        self.greeting: Greeting | None = None
        self.abort_reason: str | None = None

    def open(self, now: float) -> Refusal | None:
        """Why nothing may be asked of this request any more, or None."""
        if self.state in (State.JOINED, State.FAILED, State.ABORTED):
            return Refusal(410, f"this request is over ({self.state.value})")
        if expired(self.info, now):
            return Refusal(410, "this request expired")
        return None

    def hello(self, hello: JoinHello, now: float) -> Greeting | Refusal:
        """Take HELLO if it is the first (or the same again); the greeting it fixed."""
        closed = self.open(now)
        if closed is not None:
            return closed
        ca = _certificate(hello.ca_certificate, "the device CA")
        if isinstance(ca, Refusal):
            return ca
        cert = _certificate(hello.device_certificate, "the approver's certificate")
        if isinstance(cert, Refusal):
            return cert
        ca_key = _ed25519(ca, "the device CA")
        cert_key = _ed25519(cert, "the approver's certificate")
        if isinstance(ca_key, Refusal):
            return ca_key
        if isinstance(cert_key, Refusal):
            return cert_key
        approver_der = spki_der(cert_key)
        if self.greeting is not None:
            if (approver_der == self.greeting.approver_key_der
                    and hello.ca_certificate == self.greeting.ca_pem
                    and self.state is State.GREETED):
                return self.greeting
            return Refusal(409, "another device already answered this request")
        if not _issued_by(ca, ca) or not _issued_by(cert, ca):
            return Refusal(403, "the approver's certificate is not signed by the device CA "
                                "it sent")
        if not _valid_at(cert, now):
            return Refusal(403, "the approver's certificate is not valid now")
        try:
            approver = certified_device(cert.public_bytes(serialization.Encoding.DER))
        except PeerError as exc:
            return Refusal(403, exc.message)
        if approver.appliance_id != hello.appliance_id:
            return Refusal(403, "the approver's certificate is from another appliance")
        code = pairing_code(self.device_key_der, self.wrap_public, approver_der,
                            spki_der(ca_key))
        self.greeting = Greeting(appliance_id=hello.appliance_id,
                                 ca_pem=hello.ca_certificate, approver_key_der=approver_der,
                                 approver=approver, code=code)
        self.state = State.GREETED
        return self.greeting

    def begin_approval(self, client_cert_der: bytes | None, now: float
                       ) -> Greeting | Refusal:
        """Whether the connection that presented CLIENT_CERT_DER may approve now; if so
        the request is being approved (one approval at a time)."""
        closed = self.open(now)
        if closed is not None:
            return closed
        if self.greeting is None:
            return Refusal(409, "no device has said hello to this request yet")
        if self.state is not State.GREETED:
            return Refusal(409, "this request is already being approved")
        if client_cert_der is None:
            return Refusal(403, "an approval needs the client certificate that said hello")
        try:
            cert = x509.load_der_x509_certificate(client_cert_der)
        except ValueError:
            return Refusal(403, "the client certificate cannot be read")
        key = cert.public_key()
        ca = x509.load_pem_x509_certificate(self.greeting.ca_pem.encode())
        if (not isinstance(key, Ed25519PublicKey)
                or spki_der(key) != self.greeting.approver_key_der
                or not _issued_by(cert, ca)):
            return Refusal(403, "only the device that said hello may approve")
        self.state = State.APPROVING
        return self.greeting

    def check_approval(self, approval: JoinApproval, now: float) -> CertifiedDevice | Refusal:
        """What the approval's device certificate says, once it is checked: for our key,
        signed by the hello's CA, valid now, naming the approval's device and appliance."""
        greeting = self.greeting
        assert greeting is not None and self.state is State.APPROVING
        if approval.appliance_id != greeting.appliance_id:
            return Refusal(400, "the approval names another appliance than the hello")
        if approval.device_name != self.info.device_name:
            return Refusal(400, "the approval names another device")
        try:
            mine = verify_certificate(approval.device_certificate.encode(),
                                      greeting.ca_pem.encode(), self.device_key, now)
        except PeerError as exc:
            return Refusal(400, exc.message)
        if mine.device_id != approval.device_id or mine.appliance_id != approval.appliance_id:
            return Refusal(400, "the device certificate names another device or appliance")
        return mine

    def finished(self, joined: bool) -> None:
        self.state = State.JOINED if joined else State.FAILED

    def abort(self, reason: str, now: float) -> Refusal | None:
        if self.state in (State.APPROVING, State.JOINED, State.FAILED):
            return Refusal(409, "this request is being approved or is over")
        closed = self.open(now)
        if closed is not None:
            return closed
        self.state = State.ABORTED
        self.abort_reason = reason
        return None

    def client_ca(self) -> str | None:
        """The CA a connection's client certificate must be signed by, once greeted."""
        return self.greeting.ca_pem if self.greeting is not None else None
