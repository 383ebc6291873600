"""Device identities from a real appliance (the session's `cairnd serve`): the certificate
each joined device gets, mutual TLS between two of them over 127.0.0.1, and what must
fail — a device of another appliance, an expired certificate, a swapped device CA — plus
renewal, the upgrade of a device joined before, and the revocation list following
`cairnd device revoke` through the event stream."""

from __future__ import annotations

import datetime
import logging
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from agent_helpers import MakeUser, cairn_ok, run_cairn
from cairnd_helpers import Served, run_cairnd, served_appliance
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.api import Api
from agent.client import Connection
from agent.errors import PeerError
from agent.home import AgentHome
from agent.peers import identity as ident
from agent.peers.identity import (
    PeerIdentity,
    certified_device,
    ensure_identity,
    keep_identity_fresh,
    load_identity,
    try_ensure_identity,
)
from agent.peers.revocation import RevocationList
from protocol.peers import DEVICE_CERT_LIFETIME_S

T = TypeVar("T")
REFUSED = r"certificate|decrypt error"


def with_api(home: Path, work: Callable[[Api], Awaitable[T]]) -> T:
    agent_home = AgentHome(home)

    async def main() -> T:
        async with Connection(agent_home, agent_home.load_device()) as connection:
            return await work(Api(connection))

    return trio.run(main)


def identity_of(home: Path) -> PeerIdentity:
    found = load_identity(AgentHome(home))
    assert found is not None, sorted(p.name for p in home.iterdir())
    return found


def handshake_tcp(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[bytes, bytes]:
    """A real TCP connection on 127.0.0.1 with the two contexts; each side's view of the
    other's certificate. Raises the client's ssl.SSLError when a side refuses."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    seen: dict[str, bytes | None] = {}

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError:
            return
        raw.settimeout(10)
        try:
            with server.wrap_socket(raw, server_side=True) as tls:
                seen["server"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            raw.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client.wrap_socket(raw) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert tls.recv(2) == b"ok"     # TLS 1.3: the server's verdict on our certificate
    finally:
        listener.close()
        thread.join(10)
    assert peer is not None and seen.get("server") is not None
    return peer, seen["server"]  # type: ignore[return-value]


def another_ca_pem() -> bytes:
    """A device CA certificate of no appliance (self-signed, its own key)."""
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cairn device CA other")])
    start = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def two_devices(fresh_user: MakeUser, tmp_path: Path) -> tuple[Path, Path]:
    user = fresh_user("peer")
    return user.join(tmp_path / "a", "desk"), user.join(tmp_path / "b", "laptop")


def test_join_gives_each_device_a_certificate_of_the_appliance(
        two_devices: tuple[Path, Path], appliance: Served) -> None:
    a, b = (identity_of(home) for home in two_devices)
    for home, peer in zip(two_devices, (a, b), strict=True):
        device = AgentHome(home).load_device()
        assert (peer.me.device_id, peer.me.appliance_id) == \
            (device.device_id, device.appliance_id)
        for name in (ident.KEY_FILE, ident.CERT_FILE, ident.CA_FILE):
            assert (home / name).stat().st_mode & 0o777 == 0o600
        assert peer.me.user_tag != device.user           # O is an opaque tag, not a name
        assert abs(peer.me.expires_at - (time.time() + DEVICE_CERT_LIFETIME_S)) < 600
    assert a.me.user_tag == b.me.user_tag and a.me.key_sha256 != b.me.key_sha256
    ca = (appliance.home / "secrets" / "device-ca.pem").read_bytes()
    assert a.ca_certificate_pem == b.ca_certificate_pem
    assert ident._cert_der(a.ca_certificate_pem) == ident._cert_der(ca)


def test_two_devices_shake_hands_over_tcp(two_devices: tuple[Path, Path]) -> None:
    a, b = (identity_of(home) for home in two_devices)
    seen_by_b, seen_by_a = handshake_tcp(a.server_context(), b.client_context())
    assert certified_device(seen_by_b) == a.me
    assert certified_device(seen_by_a) == b.me
    seen_by_a, seen_by_b = handshake_tcp(b.server_context(), a.client_context())
    assert certified_device(seen_by_a) == b.me


def test_a_device_of_another_user_is_certified_under_another_tag(
        two_devices: tuple[Path, Path], fresh_user: MakeUser, tmp_path: Path) -> None:
    """The CA is the appliance's, so TLS accepts another user's device; the tag tells
    them apart (the peer service refuses it)."""
    stranger = identity_of(fresh_user("other").join(tmp_path / "c"))
    mine = identity_of(two_devices[0])
    _, seen = handshake_tcp(mine.server_context(), stranger.client_context())
    assert certified_device(seen).user_tag != mine.me.user_tag


@pytest.mark.slow
def test_a_device_of_another_appliance_fails(two_devices: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    from agent_helpers import make_user

    with served_appliance(tmp_path / "other-appliance") as other:
        foreign = identity_of(make_user(other, "far").join(tmp_path / "far"))
    mine = identity_of(two_devices[0])
    assert foreign.me.appliance_id != mine.me.appliance_id
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake_tcp(mine.server_context(), foreign.client_context())
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake_tcp(foreign.server_context(), mine.client_context())


def test_an_expired_certificate_from_the_real_ca_fails(two_devices: tuple[Path, Path],
                                                       appliance: Served) -> None:
    """Signed with the appliance's own device CA key (HOME/secrets), for device b's key,
    but a day and a half ago: the CA is right, the time is not."""
    a, b = (identity_of(home) for home in two_devices)
    ca_key = serialization.load_pem_private_key(
        (appliance.home / "secrets" / "device-ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(a.ca_certificate_pem)
    device_key = serialization.load_pem_private_key(b.key_pem, password=None)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=36)
    old = (x509.CertificateBuilder()
           .subject_name(x509.Name([
               x509.NameAttribute(NameOID.COMMON_NAME, b.me.device_id),
               x509.NameAttribute(NameOID.ORGANIZATION_NAME, b.me.user_tag),
               x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, b.me.appliance_id)]))
           .issuer_name(ca_cert.subject).public_key(device_key.public_key())  # type: ignore[arg-type]
           .serial_number(x509.random_serial_number()).not_valid_before(start)
           .not_valid_after(start + datetime.timedelta(hours=24))
           .sign(ca_key, None))  # type: ignore[arg-type]
    expired = PeerIdentity(me=b.me, key_pem=b.key_pem,
                           certificate_pem=old.public_bytes(serialization.Encoding.PEM),
                           ca_certificate_pem=b.ca_certificate_pem)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake_tcp(a.server_context(), expired.client_context())
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake_tcp(expired.server_context(), a.client_context())


def test_renewal_at_half_life_keeps_the_key_and_the_ca(two_devices: tuple[Path, Path]
                                                       ) -> None:
    home = two_devices[0]
    before = identity_of(home)
    # Not yet half-way: nothing is asked, nothing written.
    same = with_api(home, lambda api: ensure_identity(api, AgentHome(home)))
    assert same == before
    later = time.time() + DEVICE_CERT_LIFETIME_S * 0.6
    renewed = with_api(home, lambda api: ensure_identity(api, AgentHome(home), now=later))
    assert renewed is not None and renewed.certificate_pem != before.certificate_pem
    assert renewed.key_pem == before.key_pem
    assert renewed.ca_certificate_pem == before.ca_certificate_pem
    assert renewed.me.key_sha256 == before.me.key_sha256
    assert identity_of(home) == renewed


def test_keep_identity_fresh_renews_and_announces(two_devices: tuple[Path, Path]) -> None:
    """The peer service's loop: quiet while the certificate is young; once the clock
    passes half its life, one renewal, announced to ON_NEW, then quiet again."""
    home = two_devices[0]
    before = identity_of(home)
    offset = [0.0]
    announced: list[PeerIdentity] = []

    async def run(api: Api) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(keep_identity_fresh, api, AgentHome(home),
                                       announced.append,
                                       clock=lambda: time.time() + offset[0],
                                       check_every_s=0.1))
            await trio.sleep(0.5)
            assert not announced                     # young: nothing asked
            offset[0] = DEVICE_CERT_LIFETIME_S * 0.6
            with trio.fail_after(60):
                while not announced:  # noqa: ASYNC110 (the loop sleeps to the old due time)
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    with_api(home, run)
    assert len(announced) == 1
    assert announced[0].certificate_pem != before.certificate_pem
    assert identity_of(home) == announced[0]


def test_a_swapped_device_ca_is_refused_and_join_still_works(
        fresh_user: MakeUser, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A home that pinned another CA (as if the appliance's had been swapped since):
    the certificate is refused, logged, nothing overwritten — and joining succeeds."""
    home = tmp_path / "swapped"
    home.mkdir(mode=0o700)
    impostor = another_ca_pem()
    (home / ident.CA_FILE).write_bytes(impostor)
    user = fresh_user("swap")
    with caplog.at_level(logging.WARNING, logger="cairn.peers"):
        user.join(home)
    assert "device CA changed" in caplog.text
    assert (home / ident.CA_FILE).read_bytes() == impostor
    assert not (home / ident.CERT_FILE).exists()
    assert load_identity(AgentHome(home)) is None
    with pytest.raises(PeerError, match="device CA changed"):
        with_api(home, lambda api: ensure_identity(api, AgentHome(home)))
    assert cairn_ok(home, "ls", "/") == ""         # everything else works


def test_sync_upgrades_a_device_joined_before_certificates(
        fresh_user: MakeUser, tmp_path: Path) -> None:
    home = fresh_user("old").join(tmp_path / "old")
    for name in (ident.KEY_FILE, ident.CERT_FILE, ident.CA_FILE):
        (home / name).unlink()
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run_cairn(home, "sync", "--once", folder)
    assert result.returncode == 0, result.stderr
    assert identity_of(home).me.device_id == AgentHome(home).load_device().device_id


def test_an_appliance_before_api_15_gives_no_identity(two_devices: tuple[Path, Path]
                                                      ) -> None:
    """No real appliance of API 1.4 is at hand: the connection is told it met one (the
    one fault injected here). Nothing is asked or written; peers stay off."""
    home = two_devices[0]
    (home / ident.CERT_FILE).unlink()

    async def old(api: Api) -> PeerIdentity | None:
        api.connection.api_version = "1.4"
        api.connection._version_checked = True
        return await try_ensure_identity(api, AgentHome(home))

    assert with_api(home, old) is None
    assert not (home / ident.CERT_FILE).exists()


def test_revocation_reaches_the_list_through_the_event_stream(
        fresh_user: MakeUser, tmp_path: Path, appliance: Served) -> None:
    """`cairnd device revoke` (another process) shows in the list within seconds,
    long before the 60 s refresh: the follower's `event: revoked` poked it."""
    user = fresh_user("rev")
    watcher = user.join(tmp_path / "watcher")
    doomed = user.join(tmp_path / "doomed")
    doomed_id = AgentHome(doomed).load_device().device_id
    revocations = RevocationList()
    took: list[float] = []
    events: list[str] = []
    hear = revocations.on_event

    def on_event(name: str, data: object) -> None:
        events.append(name)
        hear(name, data)

    revocations.on_event = on_event  # type: ignore[method-assign]

    async def watch(api: Api) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: revocations.refresh_forever(api, interval_s=3600))
            nursery.start_soon(revocations.follow_revocations, api)
            with trio.fail_after(30):
                while revocations.as_of is None:  # noqa: ASYNC110 (no hook to wait on)
                    await trio.sleep(0.05)
            assert not revocations.is_revoked(doomed_id)
            await trio.sleep(0.5)                        # the follower's stream is up
            started = time.monotonic()
            result = await trio.to_thread.run_sync(
                lambda: run_cairnd("device", "revoke", doomed_id, "--home", appliance.home))
            assert result.returncode == 0, result.stderr
            with trio.fail_after(30):
                while not revocations.is_revoked(doomed_id):  # noqa: ASYNC110
                    await trio.sleep(0.05)
            took.append(time.monotonic() - started)
            nursery.cancel_scope.cancel()

    with_api(watcher, watch)
    assert "revoked" in events
    print(f"revocation reached the list in {took[0]:.2f} s")
