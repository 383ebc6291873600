"""The device CA (appliance/device_ca.py): the CA itself, device certificates (checked with
cryptography and by a real mutual-TLS handshake in OpenSSL), user tags, block grants as
peers check them (protocol.peers), and the files in a home."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.device_ca import (
    DeviceCa,
    DeviceSubject,
    GrantHolder,
    ca_paths,
    ensure_device_ca,
    issued_by,
    key_sha256,
    load_device_ca,
    make_device_ca,
    parse_device_key,
    sign_device_certificate,
    sign_grants,
    user_tag,
    write_device_ca,
)
from appliance.errors import BadRequestError, ConfigError
from protocol.peers import (
    DEVICE_CERT_LIFETIME_S,
    GRANT_LIFETIME_S,
    GRANT_MAX_BLOCKS,
    GrantError,
    check_grant,
    verify_grant,
)

APPLIANCE = "3f5e0c1a-8d2b-4c6e-9a7f-0b1c2d3e4f50"
NOW = 1_750_000_000.0


def pem(key: object) -> str:
    assert hasattr(key, "public_key")
    return str(key.public_key().public_bytes(   # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def block_ids(count: int, salt: str = "a") -> list[str]:
    import hashlib
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(count)]


@pytest.fixture(scope="module")
def ca() -> DeviceCa:
    return make_device_ca(APPLIANCE)


def subject_of(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    return str(certificate.subject.get_attributes_for_oid(oid)[0].value)


def test_the_ca_certificate_is_a_ten_year_self_signed_ca(ca: DeviceCa) -> None:
    cert = ca.certificate
    assert subject_of(cert, NameOID.COMMON_NAME) == f"Cairn device CA {APPLIANCE[:8]}"
    assert cert.issuer == cert.subject
    assert issued_by(cert, cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3649) < life < datetime.timedelta(days=3652)
    assert cert.public_key() == ca.key.public_key()


def test_a_device_certificate_names_the_device_the_user_tag_and_the_appliance(
        ca: DeviceCa) -> None:
    device_key = Ed25519PrivateKey.generate()
    tag = user_tag(ca, 7)
    cert = sign_device_certificate(ca, device_key.public_key(),
                                   DeviceSubject("dev_0123456789abcdef", tag, APPLIANCE), NOW)
    assert issued_by(ca.certificate, cert)
    cert.verify_directly_issued_by(ca.certificate)     # cryptography's own check raises
    assert subject_of(cert, NameOID.COMMON_NAME) == "dev_0123456789abcdef"
    assert subject_of(cert, NameOID.ORGANIZATION_NAME) == tag
    assert subject_of(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == APPLIANCE
    assert cert.public_key() == device_key.public_key()
    start = datetime.datetime.fromtimestamp(NOW, datetime.UTC)
    assert cert.not_valid_before_utc == start - datetime.timedelta(minutes=5)
    assert cert.not_valid_after_utc == start + datetime.timedelta(seconds=DEVICE_CERT_LIFETIME_S)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_another_ca_did_not_sign_it(ca: DeviceCa) -> None:
    other = make_device_ca(APPLIANCE)
    cert = sign_device_certificate(other, Ed25519PrivateKey.generate().public_key(),
                                   DeviceSubject("dev_x", "t", APPLIANCE), NOW)
    assert not issued_by(ca.certificate, cert)


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def test_openssl_accepts_two_devices_in_mutual_tls(ca: DeviceCa, tmp_path: Path) -> None:
    """What the peer service does: each side presents its device certificate and trusts
    only the device CA; a handshake through a socket pair, both ways verified."""
    ca_file = _write(tmp_path, "ca.pem", ca.certificate_pem.encode())
    contexts = []
    for side, purpose in (("a", ssl.PROTOCOL_TLS_SERVER), ("b", ssl.PROTOCOL_TLS_CLIENT)):
        key = Ed25519PrivateKey.generate()
        cert = sign_device_certificate(ca, key.public_key(),
                                       DeviceSubject(f"dev_{side}", "tag", APPLIANCE))
        cert_file = _write(tmp_path, f"{side}.pem",
                           cert.public_bytes(serialization.Encoding.PEM))
        key_file = _write(tmp_path, f"{side}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(cert_file, key_file)
        context.load_verify_locations(ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False
        contexts.append(context)
    left, right = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        with contexts[0].wrap_socket(left, server_side=True) as tls:
            seen["client"] = tls.getpeercert()

    worker = threading.Thread(target=serve)
    worker.start()
    with contexts[1].wrap_socket(right) as tls:
        seen["server"] = tls.getpeercert()
    worker.join(10)
    names = {side: dict(pair[0] for pair in peer["subject"])    # type: ignore[index]
             for side, peer in seen.items()}
    assert names["client"]["commonName"] == "dev_b"
    assert names["server"]["commonName"] == "dev_a"


def test_a_certificate_of_another_ca_fails_the_handshake(ca: DeviceCa, tmp_path: Path) -> None:
    ca_file = _write(tmp_path, "ca.pem", ca.certificate_pem.encode())
    rogue = make_device_ca(APPLIANCE)
    key = Ed25519PrivateKey.generate()
    cert = sign_device_certificate(rogue, key.public_key(), DeviceSubject("dev_r", "t",
                                                                          APPLIANCE))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(_write(tmp_path, "r.pem", cert.public_bytes(
        serialization.Encoding.PEM)), _write(tmp_path, "r.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(ca_file)
    client.check_hostname = False
    left, right = socket.socketpair()

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    worker = threading.Thread(target=serve)
    worker.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        client.wrap_socket(right)
    right.close()
    worker.join(10)


@pytest.mark.parametrize("make_key", [
    lambda: rsa.generate_private_key(65537, 2048),
    lambda: ec.generate_private_key(ec.SECP256R1()),
    Ed448PrivateKey.generate,
])
def test_keys_other_than_ed25519_are_refused(make_key: object) -> None:
    key = make_key()    # type: ignore[operator]
    with pytest.raises(BadRequestError, match="Ed25519"):
        parse_device_key(pem(key))


def test_text_that_is_no_public_key_is_refused() -> None:
    with pytest.raises(BadRequestError):
        parse_device_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(BadRequestError):
        parse_device_key("hello")
    key = Ed25519PrivateKey.generate()
    assert parse_device_key(pem(key)) == key.public_key()


def test_user_tags_are_opaque_stable_and_per_appliance(ca: DeviceCa) -> None:
    tags = {user_tag(ca, user) for user in range(1, 200)}
    assert len(tags) == 199
    assert user_tag(ca, 5) == user_tag(ca, 5)
    assert all(len(tag) == 16 and int(tag, 16) >= 0 for tag in tags)
    assert user_tag(make_device_ca(APPLIANCE), 5) != user_tag(ca, 5)


def test_grants_verify_for_their_device_only(ca: DeviceCa) -> None:
    device_key = Ed25519PrivateKey.generate().public_key()
    holder = GrantHolder("dev_a", key_sha256(device_key), user_tag(ca, 1))
    ids = block_ids(GRANT_MAX_BLOCKS * 2 + 3)
    grants = sign_grants(ca, APPLIANCE, holder, ids, NOW)
    assert len(grants) == 3
    covered: set[str] = set()
    for token in grants:
        grant = verify_grant(token, ca.key.public_key(), NOW + 1)
        assert grant.expires_at == int(NOW + GRANT_LIFETIME_S)
        check_grant(grant, appliance_id=APPLIANCE, device_id="dev_a",
                    key_sha256=holder.key_sha256, user_tag=holder.user_tag,
                    block_ids=grant.blocks)
        covered |= grant.blocks
    assert covered == set(ids)
    first = verify_grant(grants[0], ca.key.public_key(), NOW)
    refusals = {
        "other_device": dict(device_id="dev_b", key_sha256=holder.key_sha256),
        # the same device id with another key: a stolen id, or an old certificate
        "other_device_key": dict(device_id="dev_a",
                                 key_sha256=key_sha256(Ed25519PrivateKey.generate()
                                                       .public_key())),
    }
    for expected, who in refusals.items():
        with pytest.raises(GrantError) as refused:
            check_grant(first, appliance_id=APPLIANCE, user_tag=holder.user_tag,
                        block_ids=list(first.blocks)[:1], **who)
        assert refused.value.reason == expected.removesuffix("_key")
    with pytest.raises(GrantError, match="another user"):
        check_grant(first, appliance_id=APPLIANCE, device_id="dev_a",
                    key_sha256=holder.key_sha256, user_tag=user_tag(ca, 2),
                    block_ids=list(first.blocks)[:1])
    with pytest.raises(GrantError) as refused:
        check_grant(first, appliance_id=APPLIANCE, device_id="dev_a",
                    key_sha256=holder.key_sha256, user_tag=holder.user_tag,
                    block_ids=[ids[-1]])
    assert refused.value.reason == "other_blocks"
    with pytest.raises(GrantError) as refused:
        verify_grant(grants[0], ca.key.public_key(), NOW + GRANT_LIFETIME_S + 1)
    assert refused.value.reason == "expired"
    with pytest.raises(GrantError) as refused:
        verify_grant(grants[0], make_device_ca(APPLIANCE).key.public_key(), NOW)
    assert refused.value.reason == "forged"


def test_no_blocks_no_grants(ca: DeviceCa) -> None:
    assert sign_grants(ca, APPLIANCE, GrantHolder("d", "k" * 64, "t"), [], NOW) == []


# --- files ------------------------------------------------------------------------------

def test_a_home_without_a_ca_gets_one_and_keeps_it(tmp_path: Path) -> None:
    made = ensure_device_ca(tmp_path, APPLIANCE)
    key_path, certificate_path = ca_paths(tmp_path)
    for path in (key_path, certificate_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_path.parent.stat().st_mode) == 0o700
    again = ensure_device_ca(tmp_path, APPLIANCE)
    assert again.certificate == made.certificate
    assert key_sha256(again.key.public_key()) == key_sha256(made.key.public_key())
    assert not list(key_path.parent.glob("*.tmp"))


def test_a_lost_ca_certificate_is_made_again_for_the_same_key(tmp_path: Path) -> None:
    made = ensure_device_ca(tmp_path, APPLIANCE)
    ca_paths(tmp_path)[1].unlink()
    again = ensure_device_ca(tmp_path, APPLIANCE)
    assert again.certificate.public_key() == made.key.public_key()


def test_a_lost_ca_key_stops_the_appliance(tmp_path: Path) -> None:
    ensure_device_ca(tmp_path, APPLIANCE)
    ca_paths(tmp_path)[0].unlink()
    with pytest.raises(ConfigError, match="missing"):
        ensure_device_ca(tmp_path, APPLIANCE)


def test_a_damaged_or_mismatched_ca_is_refused(tmp_path: Path) -> None:
    write_device_ca(tmp_path, make_device_ca(APPLIANCE))
    key_path, certificate_path = ca_paths(tmp_path)
    other = make_device_ca(APPLIANCE)
    certificate_path.write_bytes(other.certificate.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not the certificate"):
        load_device_ca(tmp_path)
    key_path.write_bytes(os.urandom(64))
    with pytest.raises(ConfigError, match="damaged"):
        load_device_ca(tmp_path)
