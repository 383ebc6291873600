"""The device identity (agent/peers/identity.py) without an appliance: a device CA and
certificates made here with cryptography the way protocol/peers.py describes them, the
checks on an issued certificate, the CA pin, renewal timing, and real TLS handshakes
between the contexts over a socket pair."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.errors import PeerError
from agent.home import AgentHome, DeviceRecord
from agent.peers import identity as ident
from agent.peers.identity import (
    PeerIdentity,
    certified_device,
    load_identity,
    needs_renewal,
    save_certificate,
)
from protocol.models import DeviceCertificate
from protocol.peers import DEVICE_CERT_LIFETIME_S, spki_sha256

NOW = time.time()
# What a refused handshake says, on whichever side saw it first (not a timeout or a reset).
REFUSED = r"certificate|decrypt error"


@dataclass
class CA:
    key: Ed25519PrivateKey
    cert: x509.Certificate
    appliance_id: str

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_ca(appliance_id: str = "app-1") -> CA:
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cairn device CA"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, appliance_id)])
    start = datetime.datetime.fromtimestamp(NOW - 3600, datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(key, None))
    return CA(key, cert, appliance_id)


def issue(ca: CA, device_key: Ed25519PrivateKey, *, device_id: str = "dev-1",
          user_tag: str = "u-1", start: float | None = None,
          lifetime: float = DEVICE_CERT_LIFETIME_S, names: bool = True) -> bytes:
    begin = datetime.datetime.fromtimestamp(NOW - 60 if start is None else start,
                                            datetime.UTC)
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
    if names:
        attributes += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, user_tag),
                       x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ca.appliance_id)]
    cert = (x509.CertificateBuilder().subject_name(x509.Name(attributes))
            .issuer_name(ca.cert.subject).public_key(device_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(begin)
            .not_valid_after(begin + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca.key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def identity(ca: CA, *, device_id: str = "dev-1", cert_ca: CA | None = None,
             **options: object) -> PeerIdentity:
    """A device of CA (trusting CA), whose certificate CERT_CA signed (default CA)."""
    key = Ed25519PrivateKey.generate()
    pem = issue(cert_ca or ca, key, device_id=device_id, **options)  # type: ignore[arg-type]
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return PeerIdentity(me=certified_device(der), key_pem=key_pem(key),
                        certificate_pem=pem, ca_certificate_pem=ca.pem)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[bytes, bytes]:
    """Both sides' view of the other's certificate (DER) after a handshake over a socket
    pair; raises the side's ssl.SSLError when it fails."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                seen["server"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["server_error"] = exc
            a.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert tls.version() == "TLSv1.3"
            assert tls.recv(2) == b"ok"   # TLS 1.3: the server's verdict on our cert
    finally:
        b.close()
        thread.join(10)
    if "server_error" in seen:
        raise seen["server_error"]  # type: ignore[misc]
    assert peer is not None
    return peer, seen["server"]  # type: ignore[return-value]


# --- certificates ---------------------------------------------------------------------


def test_certified_device_reads_the_names_and_binds_the_key() -> None:
    ca, key = make_ca("app-9"), Ed25519PrivateKey.generate()
    pem = issue(ca, key, device_id="dev-7", user_tag="tag-3")
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    device = certified_device(der)
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (device.device_id, device.user_tag, device.appliance_id) == \
        ("dev-7", "tag-3", "app-9")
    assert device.key_sha256 == spki_sha256(spki)
    assert abs(device.expires_at - (NOW - 60 + DEVICE_CERT_LIFETIME_S)) < 2


def test_certified_device_refuses_missing_names_and_garbage() -> None:
    ca = make_ca()
    pem = issue(ca, Ed25519PrivateKey.generate(), names=False)
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    with pytest.raises(PeerError, match="exactly one O"):
        certified_device(der)
    with pytest.raises(PeerError, match="cannot be read"):
        certified_device(b"\x30\x03junk")


def test_verify_certificate_checks_signer_key_and_time() -> None:
    ca, other, key = make_ca(), make_ca(), Ed25519PrivateKey.generate()
    good = issue(ca, key)
    assert ident.verify_certificate(good, ca.pem, key, NOW).device_id == "dev-1"
    with pytest.raises(PeerError, match="not signed by the device CA"):
        ident.verify_certificate(issue(other, key), ca.pem, key, NOW)
    with pytest.raises(PeerError, match="another key"):
        ident.verify_certificate(good, ca.pem, Ed25519PrivateKey.generate(), NOW)
    with pytest.raises(PeerError, match="not valid now"):
        ident.verify_certificate(good, ca.pem, key, NOW + DEVICE_CERT_LIFETIME_S + 1)


def test_renewal_at_half_life() -> None:
    pem = issue(make_ca(), Ed25519PrivateKey.generate(), start=NOW, lifetime=1000)
    assert not needs_renewal(pem, NOW)
    assert not needs_renewal(pem, NOW + 499)
    assert needs_renewal(pem, NOW + 501)
    assert needs_renewal(pem, NOW - 10)          # not valid yet: the clock is not trusted
    assert ident.renewal_due_at(pem) == pytest.approx(NOW + 500, abs=1)


# --- files in HOME and the CA pin ------------------------------------------------------


def enrolled_home(path: Path, ca: CA, device_id: str = "dev-1") -> AgentHome:
    home = AgentHome(path)
    home.save_device(DeviceRecord(appliance_id=ca.appliance_id, url="https://127.0.0.1:1",
                                  fingerprint="", certificate="", device_id=device_id,
                                  device_name="laptop", user="alice", token="t"))
    return home


def answer(ca: CA, home: AgentHome, **options: object) -> DeviceCertificate:
    pem = issue(ca, ident.device_key(home), **options)  # type: ignore[arg-type]
    return DeviceCertificate(certificate=pem.decode(), ca_certificate=ca.pem.decode(),
                             expires_at=0, user_tag="u-1")


def test_save_certificate_pins_the_first_ca_and_refuses_another(tmp_path: Path) -> None:
    ca = make_ca()
    home = enrolled_home(tmp_path, ca)
    assert load_identity(home) is None
    saved = save_certificate(home, answer(ca, home), device_id="dev-1",
                             appliance_id=ca.appliance_id)
    for name in (ident.KEY_FILE, ident.CERT_FILE, ident.CA_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert load_identity(home) == saved
    before = (tmp_path / ident.CERT_FILE).read_bytes()
    # Another CA, even one naming the same appliance: refused, nothing written.
    impostor = make_ca(ca.appliance_id)
    with pytest.raises(PeerError, match="device CA changed"):
        save_certificate(home, answer(impostor, home), device_id="dev-1",
                         appliance_id=ca.appliance_id)
    assert (tmp_path / ident.CERT_FILE).read_bytes() == before
    assert (tmp_path / ident.CA_FILE).read_bytes() == ca.pem
    # The same CA renews fine.
    renewed = save_certificate(home, answer(ca, home), device_id="dev-1",
                               appliance_id=ca.appliance_id)
    assert renewed.certificate_pem != before


def test_save_certificate_refuses_another_device_or_key(tmp_path: Path) -> None:
    ca = make_ca()
    home = enrolled_home(tmp_path, ca)
    with pytest.raises(PeerError, match="another device"):
        save_certificate(home, answer(ca, home, device_id="dev-2"), device_id="dev-1",
                         appliance_id=ca.appliance_id)
    wrong_key = issue(ca, Ed25519PrivateKey.generate())
    with pytest.raises(PeerError, match="another key"):
        save_certificate(home, DeviceCertificate(certificate=wrong_key.decode(),
                                                 ca_certificate=ca.pem.decode(),
                                                 expires_at=0, user_tag="u-1"),
                         device_id="dev-1", appliance_id=ca.appliance_id)
    assert not (tmp_path / ident.CA_FILE).exists()   # nothing pinned from a bad answer


def test_device_key_is_kept_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    home = AgentHome(tmp_path)
    first = ident.device_key(home)
    assert key_pem(ident.device_key(home)) == key_pem(first)
    (tmp_path / ident.KEY_FILE).write_bytes(b"garbage")
    with pytest.raises(PeerError, match="damaged"):
        ident.device_key(home)


def test_racing_homes_keep_the_first_key(tmp_path: Path) -> None:
    """A sync and a mount of one home making the key at once: one key wins for both."""
    home = AgentHome(tmp_path)
    keys: list[bytes] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait(10)
        keys.append(key_pem(ident.device_key(home)))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(keys) == 8 and len(set(keys)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ident.KEY_FILE]


def test_load_identity_drops_an_expired_certificate(tmp_path: Path) -> None:
    ca = make_ca()
    home = enrolled_home(tmp_path, ca)
    save_certificate(home, answer(ca, home), device_id="dev-1", appliance_id=ca.appliance_id)
    assert load_identity(home, now=NOW) is not None
    assert load_identity(home, now=NOW + DEVICE_CERT_LIFETIME_S) is None


# --- handshakes -----------------------------------------------------------------------


def test_two_devices_of_one_ca_shake_hands_and_see_each_other() -> None:
    ca = make_ca()
    server, client = identity(ca, device_id="srv"), identity(ca, device_id="cli")
    seen_by_client, seen_by_server = handshake(server.server_context(),
                                               client.client_context())
    assert certified_device(seen_by_client) == server.me
    assert certified_device(seen_by_server) == client.me


@pytest.mark.parametrize("who", ["client", "server"])
def test_a_certificate_of_another_appliance_fails(who: str) -> None:
    ca, other = make_ca(), make_ca()
    good, stranger = identity(ca), identity(ca, cert_ca=other)
    server, client = (good, stranger) if who == "client" else (stranger, good)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(server.server_context(), client.client_context())


def test_a_self_signed_certificate_fails() -> None:
    ca = make_ca()
    lone = make_ca(ca.appliance_id)     # signs its own device certificate: self-made
    key = Ed25519PrivateKey.generate()
    pem = issue(lone, key)
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    forger = PeerIdentity(me=certified_device(der), key_pem=key_pem(key),
                          certificate_pem=pem, ca_certificate_pem=lone.pem)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(identity(ca).server_context(), forger.client_context())


def test_an_expired_certificate_fails() -> None:
    ca = make_ca()
    old = identity(ca, start=NOW - 2 * DEVICE_CERT_LIFETIME_S)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(identity(ca).server_context(), old.client_context())
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(old.server_context(), identity(ca).client_context())


def test_a_client_without_a_certificate_fails() -> None:
    ca = make_ca()
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca.pem.decode())
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(identity(ca).server_context(), bare)


def test_contexts_are_tls13_only() -> None:
    peer = identity(make_ca())
    for context in (peer.server_context(), peer.client_context()):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
    assert not peer.client_context().check_hostname
