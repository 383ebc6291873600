"""The appliance's side of LAN peers (API 1.5), against a real `cairnd serve` on 127.0.0.1:
device certificates (signed by the device CA, renewed, refused for other key kinds and for
revoked devices), the revocation list and its `revoked` event, block grants beside the
download URLs (verified as a peer verifies them), the served-blocks counters of `cairnd
stats`, LAN admission (and its refusal by the config), and the CA surviving a recovery.

Each module-scoped appliance is this file's own: revoking devices there must not send
`revoked` events to other tests' agents.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from api_helpers import (
    Device,
    add_user,
    b64,
    create_file,
    enroll,
    make_root,
    new_code,
    pinned_context,
    upload,
)
from cairnd_helpers import (
    Served,
    database_rows,
    run_cairnd,
    run_cairnd_in_process,
    served_appliance,
    serving,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from appliance.config import write_config
from appliance.device_ca import ca_paths, key_sha256
from appliance.home import init_home
from protocol.peers import (
    DEVICE_CERT_LIFETIME_S,
    GRANT_LIFETIME_S,
    GRANT_MAX_BLOCKS,
    Grant,
    GrantError,
    check_grant,
    verify_grant,
)

pytestmark = pytest.mark.timeout(180)
REVOKED_EVENT_WITHIN_S = 10.0     # the watch polls every second; generous for a busy box


# --- helpers ------------------------------------------------------------------------------

def public_pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class Peer:
    """An enrolled device with an Ed25519 device key, as an agent of API 1.5 is."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.key = Ed25519PrivateKey.generate()
        self.certificate: dict[str, Any] | None = None

    @property
    def key_sha256(self) -> str:
        return key_sha256(self.key.public_key())

    def certify(self) -> dict[str, Any]:
        answer = self.device.ok(self.device.post("/devices/me/certificate", json={
            "public_key": public_pem(self.key)}))
        self.certificate = dict(answer)
        return self.certificate


def join(served: Served, user: str, name: str, *, first: bool = False) -> Device:
    code = add_user(served.home, user) if first else new_code(served.home, user)
    return enroll(served.url, served.config.tls_certificate, code, name)


def ca_certificate(served: Served) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca_paths(served.home)[1].read_bytes())


def stats(served: Served) -> dict[str, Any]:
    result = run_cairnd("stats", "--home", served.home, "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def stored_file(device: Device, blocks: list[bytes]) -> dict[str, Any]:
    """A file of BLOCKS, uploaded whole; its node."""
    written = create_file(device, root_of(device), blocks)
    upload(device, written["upload"], blocks)
    return dict(written["node"])


_roots: dict[str, str] = {}


def root_of(device: Device) -> str:
    if device.user not in _roots:
        response = device.get("/root")
        _roots[device.user] = (response.json()["id"] if response.status_code == 200
                               else make_root(device)["id"])
    return _roots[device.user]


def grants_of(detail: dict[str, Any], served: Served) -> list[Grant]:
    ca_key = ca_certificate(served).public_key()
    assert isinstance(ca_key, type(Ed25519PrivateKey.generate().public_key()))
    return [verify_grant(token, ca_key, time.time()) for token in detail["peer_grants"]]


def check_for(peer: Peer, grant: Grant, served: Served, blocks: list[str]) -> None:
    assert peer.certificate is not None
    check_grant(grant, appliance_id=served.server.appliance_id,
                device_id=peer.device.device_id, key_sha256=peer.key_sha256,
                user_tag=peer.certificate["user_tag"], block_ids=blocks)


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_appliance(tmp_path_factory.mktemp("peers") / "appliance", disks=4,
                          data_shards=2, parity_shards=1) as running:
        yield running


@pytest.fixture(scope="module")
def alice(served: Served) -> Peer:
    return Peer(join(served, "alice", "alice-laptop", first=True))


@pytest.fixture(scope="module")
def alice_desktop(served: Served, alice: Peer) -> Peer:
    return Peer(join(served, "alice", "alice-desktop"))


@pytest.fixture(scope="module")
def bob(served: Served) -> Peer:
    return Peer(join(served, "bob", "bob-phone", first=True))


# --- certificates -------------------------------------------------------------------------

def test_a_device_certificate_is_signed_by_the_device_ca(served: Served, alice: Peer) -> None:
    before = time.time()
    answer = alice.certify()
    certificate = x509.load_pem_x509_certificate(answer["certificate"].encode())
    ca = x509.load_pem_x509_certificate(answer["ca_certificate"].encode())
    assert ca == ca_certificate(served)           # the CA the home keeps
    certificate.verify_directly_issued_by(ca)     # raises unless the CA signed it

    def name(oid: x509.ObjectIdentifier) -> str:
        return str(certificate.subject.get_attributes_for_oid(oid)[0].value)

    assert name(NameOID.COMMON_NAME) == alice.device.device_id
    assert name(NameOID.ORGANIZATION_NAME) == answer["user_tag"] != "alice"
    assert "alice" not in certificate.subject.rfc4514_string()
    assert name(NameOID.ORGANIZATIONAL_UNIT_NAME) == served.server.appliance_id
    assert certificate.public_key() == alice.key.public_key()
    assert before + DEVICE_CERT_LIFETIME_S - 5 <= answer["expires_at"] \
        <= time.time() + DEVICE_CERT_LIFETIME_S + 5
    assert answer["expires_at"] == int(certificate.not_valid_after_utc.timestamp())
    assert database_rows(served.config, "SELECT cert_key_sha256 FROM devices WHERE id = ?",
                         alice.device.device_id) == [(alice.key_sha256,)]


def test_asking_again_renews_and_a_new_key_replaces_the_old(served: Served,
                                                             alice_desktop: Peer) -> None:
    first = alice_desktop.certify()
    again = alice_desktop.certify()
    assert again["certificate"] != first["certificate"]        # a new serial at least
    assert again["user_tag"] == first["user_tag"]
    alice_desktop.key = Ed25519PrivateKey.generate()
    renewed = alice_desktop.certify()
    certificate = x509.load_pem_x509_certificate(renewed["certificate"].encode())
    assert certificate.public_key() == alice_desktop.key.public_key()
    assert database_rows(served.config, "SELECT cert_key_sha256 FROM devices WHERE id = ?",
                         alice_desktop.device.device_id) == [(alice_desktop.key_sha256,)]


def test_users_have_different_tags(alice: Peer, bob: Peer) -> None:
    assert (alice.certificate or alice.certify())["user_tag"] != bob.certify()["user_tag"]


@pytest.mark.parametrize("key", ["ecdsa", "garbage"])
def test_keys_that_are_not_ed25519_are_refused(alice: Peer, key: str) -> None:
    text = public_pem(ec.generate_private_key(ec.SECP256R1())) if key == "ecdsa" \
        else "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
    response = alice.device.post("/devices/me/certificate", json={"public_key": text})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert ("Ed25519" if key == "ecdsa" else "not a PEM public key") in error["message"]


# --- grants -------------------------------------------------------------------------------

def test_download_urls_come_with_grants_for_the_callers_certificate(
        served: Served, alice: Peer, alice_desktop: Peer) -> None:
    alice.certify()
    blocks = [os.urandom(20_000 + i) for i in range(GRANT_MAX_BLOCKS + 6)]
    node = stored_file(alice.device, blocks)
    ids = [blake3.blake3(b).hexdigest() for b in blocks]
    detail = alice.device.ok(alice.device.get(f"/files/{node['id']}"))
    assert detail["method"] == "GET"
    grants = grants_of(detail, served)
    assert len(grants) == 2
    assert set().union(*(g.blocks for g in grants)) == set(ids)
    for grant in grants:
        assert abs(grant.expires_at - (time.time() + GRANT_LIFETIME_S)) < 30
        check_for(alice, grant, served, sorted(grant.blocks))
    # Another device of the same user, or the same device id with another key: refused.
    alice_desktop.certify()
    with pytest.raises(GrantError, match="another device"):
        check_for(alice_desktop, grants[0], served, sorted(grants[0].blocks)[:1])
    impostor = Peer(alice.device)
    impostor.certificate = alice.certificate
    with pytest.raises(GrantError, match="another device"):
        check_for(impostor, grants[0], served, sorted(grants[0].blocks)[:1])
    # A window of the blocks: grants for that window only.
    window = alice.device.ok(alice.device.get(
        f"/files/{node['id']}/presigned-url", params={"offset": 10, "limit": 5}))
    (only,) = grants_of(window, served)
    assert only.blocks == set(ids[10:15])


def test_a_file_still_uploading_gets_grants_for_its_stored_blocks(
        served: Served, alice: Peer) -> None:
    alice.certify()
    blocks = [os.urandom(30_000) for _ in range(4)]
    written = create_file(alice.device, root_of(alice.device), blocks)
    by_id = {blake3.blake3(b).hexdigest(): b for b in blocks}
    first_two = [entry for entry in written["upload"]
                 if entry["block_id"] in {blake3.blake3(b).hexdigest() for b in blocks[:2]}]
    upload(alice.device, first_two, list(by_id.values()))
    detail = alice.device.ok(alice.device.get(
        f"/files/{written['node']['id']}/presigned-url", params={"stored_only": "true"}))
    assert detail["method"] == "GET" and len(detail["blocks"]) == 2
    (grant,) = grants_of(detail, served)
    assert grant.blocks == {entry["block_id"] for entry in first_two}
    check_for(alice, grant, served, sorted(grant.blocks))


def test_a_device_without_a_certificate_gets_no_grants(served: Served, alice: Peer) -> None:
    plain = join(served, "alice", "alice-old-agent")
    try:
        node = stored_file(alice.device, [os.urandom(5000)])
        detail = plain.ok(plain.get(f"/files/{node['id']}"))
        assert detail["method"] == "GET" and detail["blocks"]
        assert detail["peer_grants"] == []
    finally:
        plain.close()


def test_the_reader_of_a_shared_file_gets_grants_for_its_own_certificate(
        served: Served, alice: Peer, bob: Peer) -> None:
    alice.certify()
    bob.certify()
    blocks = [os.urandom(10_000) for _ in range(3)]
    node = stored_file(alice.device, blocks)
    refused = bob.device.get(f"/files/{node['id']}")
    assert refused.status_code == 404          # the same read check as before
    alice.device.ok(alice.device.post(f"/files/{node['id']}/share", json={
        "grants": [{"user": bob.device.user, "wrapped_key": b64(b"wrapped-for-bob")}]}))
    detail = bob.device.ok(bob.device.get(f"/files/{node['id']}"))
    (grant,) = grants_of(detail, served)
    check_for(bob, grant, served, [blake3.blake3(b).hexdigest() for b in blocks])
    # Bob's tag, not the owner's: alice's devices know the grant is not their user's.
    with pytest.raises(GrantError):
        check_grant(grant, appliance_id=served.server.appliance_id,
                    device_id=bob.device.device_id, key_sha256=bob.key_sha256,
                    user_tag=(alice.certificate or {})["user_tag"], block_ids=[])


# --- counters -----------------------------------------------------------------------------

def test_stats_count_the_blocks_and_bytes_served(served: Served, alice: Peer) -> None:
    blocks = [os.urandom(40_000 + 1000 * i) for i in range(5)]
    node = stored_file(alice.device, blocks)
    detail = alice.device.ok(alice.device.get(f"/files/{node['id']}"))
    before = stats(served)
    for entry in detail["blocks"]:
        assert alice.device.client.get(entry["url"]).status_code == 200
    ranged = alice.device.client.get(detail["blocks"][0]["url"],
                                     headers={"Range": "bytes=0-99"})
    assert ranged.status_code == 206
    read = alice.device.ok(alice.device.post("/blocks/read", json={
        "ids": [blake3.blake3(b).hexdigest() for b in blocks[:3]]}))
    assert all(item.get("data") for item in read["blocks"])
    after = stats(served)
    assert after["url_blocks_served"] - before["url_blocks_served"] == 6
    assert after["url_bytes_served"] - before["url_bytes_served"] == \
        sum(map(len, blocks)) + 100
    assert after["batch_blocks_served"] - before["batch_blocks_served"] == 3
    assert after["batch_bytes_served"] - before["batch_bytes_served"] == \
        sum(map(len, blocks[:3]))
    assert after["blocks_served"] - before["blocks_served"] == 9
    assert after["grants_issued"] >= 1 and after["certificates_signed"] >= 1
    text = run_cairnd("stats", "--home", served.home)
    assert text.returncode == 0 and "blocks served:" in text.stdout


def test_stats_say_so_when_no_appliance_serves(tmp_path: Path) -> None:
    config = init_home(tmp_path / "idle", disks=3, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0)
    result = run_cairnd("stats", "--home", config.home)
    assert result.returncode == 3
    assert "is not serving" in result.stderr and "Traceback" not in result.stderr


# --- LAN admission ------------------------------------------------------------------------

def test_a_device_admits_a_new_device_of_its_own_user(served: Served, alice: Peer) -> None:
    new_key = Ed25519PrivateKey.generate()
    response = alice.device.post("/devices/admit", json={
        "device_name": "alice-tablet", "public_key": public_pem(new_key)})
    assert response.status_code == 201, response.text
    admitted = response.json()
    assert admitted["user"] == "alice"
    assert admitted["appliance_id"] == served.server.appliance_id
    certificate = x509.load_pem_x509_certificate(
        admitted["certificate"]["certificate"].encode())
    certificate.verify_directly_issued_by(ca_certificate(served))
    assert certificate.public_key() == new_key.public_key()
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == \
        admitted["device_id"]
    with httpx.Client(base_url=served.url, timeout=30,
                      verify=pinned_context(served.config.tls_certificate),
                      headers={"Authorization": f"Bearer {admitted['token']}"}) as tablet:
        me = tablet.get("/me")
        assert me.status_code == 200, me.text
        assert me.json()["device_id"] == admitted["device_id"]
        assert me.json()["device_name"] == "alice-tablet"
        # Its key is on record: it gets grants at once.
        node = stored_file(alice.device, [os.urandom(3000)])
        assert tablet.get(f"/files/{node['id']}").json()["peer_grants"]
    log = served.server.stderr()
    assert (f"device {alice.device.device_id} (alice-laptop) of alice admitted new device "
            f"{admitted['device_id']} ('alice-tablet')") in log
    bad = alice.device.post("/devices/admit", json={
        "device_name": "alice-rsa", "public_key": public_pem(
            ec.generate_private_key(ec.SECP256R1()))})
    assert bad.status_code == 400


def test_admission_is_refused_when_the_config_forbids_it(tmp_path: Path) -> None:
    config = init_home(tmp_path / "strict", disks=3, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    write_config(replace(config, lan_admission=False))
    with serving(config.home) as server:
        running = Served(config, server)
        peer = Peer(join(running, "carol", "carol-laptop", first=True))
        response = peer.device.post("/devices/admit", json={
            "device_name": "carol-tablet",
            "public_key": public_pem(Ed25519PrivateKey.generate())})
        assert response.status_code == 403
        error = response.json()["error"]
        assert error["code"] == "lan_admission_disabled"
        assert "lan_admission = false" in error["message"]
        assert database_rows(config, "SELECT count(*) FROM devices") == [(1,)]
        peer.device.close()
        assert server.stop() == 0
        assert "refused a LAN admission of 'carol-tablet'" in server.stderr()


# --- revocation ---------------------------------------------------------------------------

def read_events(device: Device, found: dict[str, float], stop: threading.Event) -> None:
    """Read DEVICE's event stream until STOP, noting when each kind of event first came."""
    with httpx.Client(base_url=str(device.client.base_url), timeout=30,
                      verify=pinned_context(Path(os.environ["PEERS_TEST_CA"])),
                      headers=dict(device.client.headers)) as client, \
            client.stream("GET", "/events", params={"heartbeat": 1}) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                found.setdefault(line.removeprefix("event: "), time.monotonic())
            elif line.startswith("data: ") and "revoked" in found and "count" not in found:
                found["count"] = float(json.loads(line.removeprefix("data: "))["count"])
            if stop.is_set():
                return


def test_a_revoked_device_is_listed_announced_and_refused(
        served: Served, alice: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERS_TEST_CA", str(served.config.tls_certificate))
    victim = Peer(join(served, "alice", "alice-stolen"))
    victim.certify()
    listed = alice.device.ok(alice.device.get("/devices/revoked"))
    assert victim.device.device_id not in listed["revoked"]
    found: dict[str, float] = {}
    stop = threading.Event()
    reader = threading.Thread(target=read_events, args=(alice.device, found, stop),
                              daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while "heartbeat" not in found and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "heartbeat" in found and "revoked" not in found      # the stream is up
    revoked_at = time.monotonic()
    result = run_cairnd_in_process("device", "revoke", victim.device.device_id,
                                   "--home", served.home)
    assert result.returncode == 0, result.stderr
    while "count" not in found and time.monotonic() < revoked_at + REVOKED_EVENT_WITHIN_S:
        time.sleep(0.05)
    stop.set()
    assert "revoked" in found, f"no revoked event within {REVOKED_EVENT_WITHIN_S} s"
    took = found["revoked"] - revoked_at
    print(f"revoked event {took:.2f} s after `cairnd device revoke`")
    assert found["count"] == len(database_rows(
        served.config, "SELECT id FROM devices WHERE revoked_at IS NOT NULL"))
    listed = alice.device.ok(alice.device.get("/devices/revoked"))
    assert victim.device.device_id in listed["revoked"]
    assert listed["as_of"] <= time.time()
    refused = victim.device.post("/devices/me/certificate", json={
        "public_key": public_pem(victim.key)})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert victim.device.post("/devices/admit", json={
        "device_name": "x", "public_key": public_pem(victim.key)}).status_code == 401
    reader.join(5)
    victim.device.close()


# --- the CA in the home -------------------------------------------------------------------

def test_a_home_from_before_peers_gets_a_ca_at_its_first_start(tmp_path: Path) -> None:
    config = init_home(tmp_path / "old", disks=3, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    key_path, certificate_path = ca_paths(config.home)
    assert key_path.exists() and certificate_path.exists()      # init made one
    key_path.unlink()
    certificate_path.unlink()
    with serving(config.home) as server:
        assert key_path.exists() and certificate_path.exists()
        peer = Peer(join(Served(config, server), "dave", "dave-laptop", first=True))
        answer = peer.certify()
        assert answer["ca_certificate"].encode() == certificate_path.read_bytes()
        peer.device.close()
        assert server.stop() == 0
        assert "made the device signing key" in server.stderr()


def test_recover_keeps_the_device_ca(tmp_path: Path) -> None:
    disks = [tmp_path / "disks" / f"disk{i}" for i in range(4)]
    for disk in disks:
        disk.mkdir(parents=True)
    config = init_home(tmp_path / "home", disk_paths=disks, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    originals = [path.read_bytes() for path in ca_paths(config.home)]
    with serving(config.home) as server:
        assert server.stop() == 0                  # a clean stop writes a last copy
        log = server.stderr()
    new_home = tmp_path / "recovered"
    result = run_cairnd("recover", "--home", new_home,
                        *[a for disk in disks for a in ("--disk-path", str(disk))])
    assert result.returncode == 0, result.stderr + log
    assert [path.read_bytes() for path in ca_paths(new_home)] == originals
    assert all(path.stat().st_mode & 0o077 == 0 for path in ca_paths(new_home))
    with serving(new_home) as server:
        assert server.stop() == 0
    assert [path.read_bytes() for path in ca_paths(new_home)] == originals
