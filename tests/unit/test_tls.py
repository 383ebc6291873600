"""The self-signed certificate: names, key, validity, fingerprint, files."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.errors import ConfigError
from appliance.tls import (
    certificate_fingerprint,
    ensure_certificate,
    make_self_signed_certificate,
    read_certificate_fingerprint,
    subject_alternative_names,
    write_self_signed_certificate,
)


def _sans(pem: bytes) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return dns, ips


def test_names_cover_loopback_listen_host_and_hostname() -> None:
    made = make_self_signed_certificate(subject_alternative_names("192.168.7.20"))
    dns, ips = _sans(made.certificate_pem)
    assert {"localhost", socket.gethostname().lower()} <= dns
    assert {"127.0.0.1", "::1", "192.168.7.20"} <= ips


def test_dns_listen_host_and_duplicates() -> None:
    made = make_self_signed_certificate(["nas.local", "localhost", "LOCALHOST", "[::1]", "::1"])
    dns, ips = _sans(made.certificate_pem)
    assert dns == {"nas.local", "localhost"}
    assert ips == {"::1"}


def test_wildcard_listen_address_is_not_a_name() -> None:
    dns, ips = _sans(make_self_signed_certificate(["0.0.0.0", "::", "localhost"])
                     .certificate_pem)
    assert ips == set()
    assert dns == {"localhost"}


def test_key_and_validity() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    made = make_self_signed_certificate(["localhost"], now=now)
    cert = x509.load_pem_x509_certificate(made.certificate_pem)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    assert cert.not_valid_before_utc <= now
    lifetime = cert.not_valid_after_utc - now
    assert datetime.timedelta(days=3649) < lifetime <= datetime.timedelta(days=3651)
    assert cert.issuer == cert.subject
    assert b"PRIVATE KEY" in made.key_pem


def test_fingerprint_is_sha256_of_der_lowercase_hex() -> None:
    made = make_self_signed_certificate(["localhost"])
    der = ssl.PEM_cert_to_DER_cert(made.certificate_pem.decode())
    expected = hashlib.sha256(der).hexdigest()
    assert certificate_fingerprint(made.certificate_pem) == expected == made.fingerprint
    assert len(expected) == 64 and expected == expected.lower()


def test_fingerprint_of_garbage() -> None:
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        certificate_fingerprint(b"hello")


def test_written_files_and_modes(tmp_path: Path) -> None:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    fingerprint = write_self_signed_certificate(cert, key, "127.0.0.1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    assert read_certificate_fingerprint(cert) == fingerprint
    # The pair loads as a server identity and as a client's only trust anchor.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    assert client.get_ca_certs()[0]["subject"]


def test_ensure_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = ensure_certificate(cert, key)
    assert ensure_certificate(cert, key) == made  # present: kept, never replaced
    key.unlink()
    with pytest.raises(ConfigError, match=r"TLS key .* is missing"):
        ensure_certificate(cert, key)
    cert.unlink()
    key.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"TLS certificate .* is missing"):
        ensure_certificate(cert, key)


def test_unreadable_certificate(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read TLS certificate"):
        read_certificate_fingerprint(tmp_path / "absent.pem")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ConfigError, match=r"bad\.pem: not a PEM certificate"):
        read_certificate_fingerprint(tmp_path / "bad.pem")


def test_ip_san_types() -> None:
    made = make_self_signed_certificate(["10.0.0.1"])
    cert = x509.load_pem_x509_certificate(made.certificate_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
