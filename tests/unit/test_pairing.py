"""The pure parts of LAN pairing: the user's keys sealed to a wrap key, the new device's
session (which hello counts, who may approve, what an approval must carry, expiry, aborts),
and a request checked against the certificate its connection saw. Certificates are made
here with cryptography, as the appliance's device CA makes them (protocol/peers.py)."""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.crypto.keys import UserKeys
from agent.errors import IntegrityError
from agent.pairing.pending import found_request
from agent.pairing.sealing import open_keys, seal_keys
from agent.pairing.session import Greeting, JoinSession, Refusal, State, spki_der
from agent.peers.identity import public_key_pem
from protocol.pairing import JoinApproval, JoinHello, JoinRequestInfo, pairing_code

NOW = 1_800_000_000.0
APPLIANCE = "a" * 32


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


@dataclass
class Authority:
    """A device CA and what it signs."""

    key: Ed25519PrivateKey
    cert: x509.Certificate
    appliance_id: str = APPLIANCE

    @staticmethod
    def make(appliance_id: str = APPLIANCE) -> Authority:
        key = Ed25519PrivateKey.generate()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cairn device CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(when(NOW - 3600)).not_valid_after(when(NOW + 10 ** 8))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(key, None))
        return Authority(key, cert, appliance_id)

    def device(self, key: Ed25519PrivateKey, device_id: str | None = None,
               until: float = NOW + 86400) -> x509.Certificate:
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, device_id or secrets.token_hex(8)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "usertag"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.appliance_id)])
        return (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(when(NOW - 300)).not_valid_after(when(until))
                .sign(self.key, None))


def new_session(lifetime: float = 600) -> tuple[JoinSession, Ed25519PrivateKey,
                                                 X25519PrivateKey]:
    key, wrap = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    info = JoinRequestInfo(device_name="phone", device_key=public_key_pem(key),
                           wrap_key="A" * 43 + "=", created_at=NOW,
                           expires_at=NOW + lifetime)
    return JoinSession(info, key, wrap.public_key().public_bytes_raw()), key, wrap


def hello_of(ca: Authority, approver: Ed25519PrivateKey, **cert: object
             ) -> tuple[JoinHello, x509.Certificate]:
    device_cert = ca.device(approver, **cert)  # type: ignore[arg-type]
    return JoinHello(appliance_id=ca.appliance_id, ca_certificate=pem(ca.cert),
                     device_certificate=pem(device_cert)), device_cert


# --- sealing ----------------------------------------------------------------------------------


def test_sealed_keys_open_only_for_that_wrap_key_device_user_and_appliance() -> None:
    keys, wrap = UserKeys.generate(), X25519PrivateKey.generate()
    bound = {"appliance_id": APPLIANCE, "user": "alice", "device_id": "dev_1"}
    sealed = seal_keys(keys, wrap.public_key().public_bytes_raw(), **bound)
    assert open_keys(wrap, sealed, **bound) == keys
    with pytest.raises(IntegrityError):
        open_keys(X25519PrivateKey.generate(), sealed, **bound)
    for field, other in (("appliance_id", "b" * 32), ("user", "bob"), ("device_id", "dev_2")):
        with pytest.raises(IntegrityError):
            open_keys(wrap, sealed, **{**bound, field: other})
    for position in (0, 1, 40, len(sealed) - 1):
        flipped = bytearray(sealed)
        flipped[position] ^= 1
        with pytest.raises(IntegrityError):
            open_keys(wrap, bytes(flipped), **bound)


# --- the session ------------------------------------------------------------------------------


def test_the_first_hello_fixes_the_code_and_a_second_one_is_refused() -> None:
    session, key, wrap = new_session()
    ca, approver = Authority.make(), Ed25519PrivateKey.generate()
    hello, _ = hello_of(ca, approver)
    greeting = session.hello(hello, NOW + 1)
    assert isinstance(greeting, Greeting)
    assert greeting.code == pairing_code(spki_der(key.public_key()),
                                         wrap.public_key().public_bytes_raw(),
                                         spki_der(approver.public_key()),
                                         spki_der(ca.key.public_key()))
    assert session.client_ca() == pem(ca.cert)
    assert session.hello(hello, NOW + 2) == greeting            # the same one again
    rogue_ca = Authority.make()
    rogue, _ = hello_of(rogue_ca, Ed25519PrivateKey.generate())
    assert session.hello(rogue, NOW + 3) == Refusal(409, "another device already answered "
                                                         "this request")
    # Even the same CA with another of its devices: the approver is fixed.
    other, _ = hello_of(ca, Ed25519PrivateKey.generate())
    assert isinstance(session.hello(other, NOW + 3), Refusal)
    assert session.greeting == greeting


@pytest.mark.parametrize("case", ["not_signed", "expired", "other_appliance", "garbage"])
def test_a_hello_whose_certificate_does_not_hold_is_refused_and_fixes_nothing(
        case: str) -> None:
    session, _, _ = new_session()
    ca, approver = Authority.make(), Ed25519PrivateKey.generate()
    hello, _ = hello_of(ca, approver, until=NOW - 1 if case == "expired" else NOW + 86400)
    if case == "not_signed":
        hello = hello.model_copy(update={"ca_certificate": pem(Authority.make().cert)})
    elif case == "other_appliance":
        hello = hello.model_copy(update={"appliance_id": "c" * 32})
    elif case == "garbage":
        hello = hello.model_copy(update={"device_certificate": "not a certificate"})
    outcome = session.hello(hello, NOW)
    assert isinstance(outcome, Refusal) and outcome.status in (400, 403), outcome
    assert session.greeting is None and session.state is State.WAITING


def test_only_the_certificate_that_said_hello_may_approve_and_only_once() -> None:
    session, _, _ = new_session()
    ca, approver = Authority.make(), Ed25519PrivateKey.generate()
    assert isinstance(session.begin_approval(None, NOW), Refusal)     # no hello yet
    hello, cert = hello_of(ca, approver)
    session.hello(hello, NOW)
    same_ca_other_key = ca.device(Ed25519PrivateKey.generate())
    same_key_other_ca = Authority.make().device(approver)
    for presented in (None, der(same_ca_other_key), der(same_key_other_ca), b"junk"):
        refused = session.begin_approval(presented, NOW)
        assert isinstance(refused, Refusal) and refused.status == 403, presented
    # A renewed certificate of the same key from the same CA is the same approver.
    assert isinstance(session.begin_approval(der(ca.device(approver)), NOW), Greeting)
    assert session.state is State.APPROVING
    assert session.begin_approval(der(cert), NOW) == Refusal(
        409, "this request is already being approved")
    assert isinstance(session.abort("late", NOW), Refusal)


def approval_for(session: JoinSession, ca: Authority, key: Ed25519PrivateKey,
                 device_id: str = "dev_new", **changes: str) -> JoinApproval:
    fields = {"appliance_id": ca.appliance_id, "urls": ["https://10.0.0.1:8443"],
              "appliance_certificate": "pem", "device_id": device_id,
              "device_name": session.info.device_name, "token": "t", "user": "alice",
              "device_certificate": pem(ca.device(key, device_id=device_id)),
              "sealed_keys": "AA=="}
    return JoinApproval(**{**fields, **changes})


def test_an_approval_must_carry_a_certificate_for_our_key_from_the_hellos_ca() -> None:
    session, key, _ = new_session()
    ca, approver = Authority.make(), Ed25519PrivateKey.generate()
    hello, cert = hello_of(ca, approver)
    session.hello(hello, NOW)
    session.begin_approval(der(cert), NOW)
    good = approval_for(session, ca, key)
    mine = session.check_approval(good, NOW)
    assert not isinstance(mine, Refusal) and mine.device_id == "dev_new"
    bad = [
        approval_for(session, ca, Ed25519PrivateKey.generate()),       # not our key
        approval_for(session, Authority.make(), key),                  # another CA
        approval_for(session, ca, key, device_name="laptop"),
        good.model_copy(update={"device_id": "dev_other"}),
        good.model_copy(update={"appliance_id": "c" * 32}),
    ]
    for approval in bad:
        assert isinstance(session.check_approval(approval, NOW), Refusal), approval


def test_expiry_and_abort_end_the_request() -> None:
    session, _, _ = new_session(lifetime=60)
    ca = Authority.make()
    hello, _ = hello_of(ca, Ed25519PrivateKey.generate())
    assert session.hello(hello, NOW + 60) == Refusal(410, "this request expired")
    assert session.open(NOW + 59) is None
    assert session.abort("the codes differ", NOW + 1) is None
    assert (session.state, session.abort_reason) == (State.ABORTED, "the codes differ")
    assert isinstance(session.hello(hello, NOW + 2), Refusal)
    assert isinstance(session.begin_approval(None, NOW + 2), Refusal)


# --- a request as read from its endpoint -------------------------------------------------------


def self_signed(key: Ed25519PrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cairn join request")])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(when(NOW - 300)).not_valid_after(when(NOW + 3600))
            .sign(key, None))


def test_a_request_must_name_the_key_its_endpoint_presented_and_be_open() -> None:
    session, key, _ = new_session()
    answer = session.info.model_dump_json().encode()
    found = found_request(answer, der(self_signed(key)), "https://x", NOW)
    assert not isinstance(found, str)
    assert found.device_key_der == spki_der(key.public_key())
    assert found_request(answer, der(self_signed(Ed25519PrivateKey.generate())),
                         "https://x", NOW) == ("the request names another key than its "
                                               "endpoint's certificate")
    assert found_request(answer, der(self_signed(key)), "https://x",
                         NOW + 600) == "the request expired"
    assert "malformed" in str(found_request(b"{}", der(self_signed(key)), "https://x", NOW))
