"""The agent's peer service against the real thing: the session's appliance (`cairnd
serve` on 127.0.0.1), real devices joined to it (each with the certificate join gives it),
`cairn sync` and `cairn mount` running as processes with `[peers] loopback = true,
interfaces = ["lo"]` (and CAIRN_DISCOVERY=off: nothing but loopback), and a real mutual-TLS
client holding another device's certificate and the grants the appliance issued it with
the download URLs.

- A device of the same user with the right grant gets the exact block: re-encrypted from a
  synced file, and from a drive's cache.
- Each refusal serves nothing: no grant, an expired one, one for another device, a revoked
  device (after `cairnd device revoke` reached the peer), a device of another user (who
  holds a real grant for the very blocks: the file was shared with them), no client
  certificate or a self-signed one (the handshake fails).
- A file changed since it was synced is not served.
- On a LAN of namespaces (tests/lan_helpers.py): the mDNS packets a peer sends, captured,
  name no user, device, appliance or account; and the other device's service finds it.

Run as a script inside a namespace (`python test_peer_service.py capture SECONDS ADDRESS`),
this file captures raw mDNS packets there for the last test.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":      # the capture script: tests/ for the helpers' imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import blake3
import pytest
import trio
from agent_helpers import User, make_user, run_cairn
from cairnd_helpers import Served, run_cairnd
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from sync_helpers import Device, devices_of, make_device, wait_for

from agent import operations as ops
from agent.crypto.blocks import BlockRef, decrypt_block
from agent.home import AgentHome
from agent.peers.identity import PeerIdentity, load_identity
from agent.peers.service import read_statuses
from protocol.peers import (
    PEER_BLOCK_PATH,
    PEER_HAVE_PATH,
    Grant,
    verify_grant,
)

LOOPBACK_PEERS = '[peers]\nloopback = true\ninterfaces = ["lo"]\n'
SIZE = 2 * 4 * 1024 * 1024 + 12345      # three blocks, the last one short


# --- helpers --------------------------------------------------------------------------

@dataclass
class Fetched:
    """What the appliance tells a device about a file: its blocks and the device's grants."""

    node_id: str
    refs: list[BlockRef]
    grants: list[str]

    @property
    def ids(self) -> list[str]:
        return [r.id_hex for r in self.refs]


def fetched(home: Path, remote: str) -> Fetched:
    """REMOTE (a path, or id:NODE) as the device at HOME reads it (GET /files/{id})."""
    agent_home = AgentHome(home)

    async def main() -> Fetched:
        async with ops.session(agent_home) as tree:
            node = await ops.resolve(tree, remote)
            detail = await tree.api.node(node.id)
            assert detail.method == "GET", detail
            return Fetched(node.id, list(node.meta.blocks), list(detail.peer_grants))

    return trio.run(main)


def identity_of(home: Path) -> PeerIdentity:
    found = load_identity(AgentHome(home))
    assert found is not None, "the device has no certificate"
    return found


def peer_status(home: Path, timeout: float = 60) -> dict[str, Any]:
    statuses = wait_for(lambda: read_statuses(AgentHome(home)), timeout,
                        f"the peer service of {home.name}")
    assert len(statuses) == 1, statuses
    return statuses[0]


class Client:
    """A device talking to a peer's service over mutual TLS (one connection)."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                      timeout=20)

    def post(self, path: str, body: object) -> tuple[int, bytes]:
        self.connection.request("POST", path, json.dumps(body).encode(),
                                {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        return response.status, response.read()

    def have(self, grants: list[str], ids: list[str]) -> tuple[int, Any]:
        status, body = self.post(PEER_HAVE_PATH, {"grants": grants, "ids": ids})
        return status, json.loads(body)

    def block(self, grant: str, block_id: str) -> tuple[int, bytes]:
        return self.post(PEER_BLOCK_PATH, {"grant": grant, "id": block_id})


def client_of(home: Path, port: int) -> Client:
    return Client(port, identity_of(home).client_context())


def covering(grants: list[str], block_id: str, identity: PeerIdentity) -> str:
    for token in grants:
        if block_id in verify_grant(token, identity.ca_public_key(), time.time()).blocks:
            return token
    raise AssertionError(f"no grant covers {block_id}")


def refusal(status: int, body: bytes) -> str:
    assert status == 403, (status, body[:200])
    return str(json.loads(body)["reason"])


def served(home: Path) -> tuple[int, dict[str, int]]:
    """The serving device's counters, once its status file caught up (written every
    second): blocks served and refusals by reason."""
    status = peer_status(home)
    return int(status["served_blocks"]), dict(status["refusals"])


def settled_counters(home: Path, want: Callable[[int, dict[str, int]], bool]
                     ) -> tuple[int, dict[str, int]]:
    deadline = time.monotonic() + 10
    while True:
        counters = served(home)
        if want(*counters) or time.monotonic() > deadline:
            return counters
        time.sleep(0.2)


def appliance_grant(appliance: Served, identity: PeerIdentity, ids: list[str],
                    expires_at: int) -> str:
    """A grant signed with the appliance's own device signing key (its home's secrets), as
    the appliance signs one, but expiring at EXPIRES_AT — the appliance only issues fresh
    ones."""
    from protocol.peers import sign_grant

    key = serialization.load_pem_private_key(
        (appliance.home / "secrets" / "device-ca.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    me = identity.me
    return sign_grant(key, Grant(appliance_id=me.appliance_id, device_id=me.device_id,
                                 key_sha256=me.key_sha256, user_tag=me.user_tag,
                                 expires_at=expires_at, blocks=frozenset(ids)))


def self_signed_context(device_id: str, user_tag: str, appliance_id: str, trust: bytes,
                        folder: Path) -> ssl.SSLContext:
    """A client context with a certificate it signed itself, naming a real device; it
    trusts the real device CA (TRUST) so that only our certificate can fail."""
    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, user_tag),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, appliance_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1)).sign(key, None))
    (folder / "self.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "self.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=trust.decode())
    context.load_cert_chain(folder / "self.pem", folder / "self.key")
    return context


def handshake_refused(port: int, context: ssl.SSLContext) -> None:
    client = Client(port, context)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        client.post(PEER_BLOCK_PATH, {"grant": "x", "id": "a" * 64})


def with_peers(device: Device) -> Device:
    (device.home / "config.toml").write_text(LOOPBACK_PEERS)
    return device


# --- a synced file, served to the user's other device --------------------------------

@dataclass
class SyncSetup:
    appliance: Served
    alice: User
    a: Device            # runs `cairn sync`, serves
    b: Device            # asks
    port: int
    file: Path
    data: bytes
    remote: Fetched      # B's view: blocks and grants


@pytest.fixture
def synced(appliance: Served, tmp_path: Path) -> Iterator[SyncSetup]:
    alice = make_user(appliance, "peers")
    a, b = devices_of(alice, tmp_path, "a", "b")
    with_peers(a)
    data = os.urandom(SIZE)
    path = a.folder / "big.bin"
    path.write_bytes(data)
    a.start()
    try:
        status = peer_status(a.home)
        assert status["addresses"] == ["127.0.0.1"]
        remote = wait_for(lambda: _uploaded(b.home, "/big.bin"), 60, "the upload")
        assert remote is not None
        yield SyncSetup(appliance, alice, a, b, int(status["port"]), path, data, remote)
    finally:
        code = a.stop()
        log = a.log_text()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        assert "peers: stopped" in log


def _uploaded(home: Path, remote: str) -> Fetched | None:
    try:
        return fetched(home, remote)
    except (AssertionError, Exception):     # not there yet, or still uploading
        return None


def test_a_synced_file_is_served_reencrypted_to_the_users_other_device(
        synced: SyncSetup) -> None:
    b, remote = synced.b, synced.remote
    assert len(remote.refs) == 3 and len(remote.grants) == 1
    client = client_of(b.home, synced.port)
    # A has the file's base once its sync recorded the upload: then HAVE says so.
    wait_for(lambda: client.have(remote.grants, remote.ids) == (200, {"have": remote.ids}),
             30, "A to hold the blocks")
    offset = 0
    for ref in remote.refs:
        status, body = client.block(remote.grants[0], ref.id_hex)
        assert status == 200
        assert blake3.blake3(body).hexdigest() == ref.id_hex
        plain = decrypt_block(ref, body)
        assert plain == synced.data[offset:offset + ref.plain_size]
        offset += ref.plain_size
    assert offset == SIZE
    _, refusals = settled_counters(synced.a.home, lambda n, _: n == 3)
    assert refusals == {}
    lines = [line for line in synced.a.log_text().splitlines() if "peers:" in line]
    assert any("serving on 127.0.0.1" in line for line in lines), lines


def test_a_file_changed_since_it_was_synced_is_not_served(synced: SyncSetup) -> None:
    b, remote = synced.b, synced.remote
    client = client_of(b.home, synced.port)
    wait_for(lambda: client.have(remote.grants, remote.ids)[1] == {"have": remote.ids},
             30, "A to hold the blocks")
    first = remote.ids[0]
    # Rewritten in place with other bytes, its size and mtime put back: the stat is the
    # base's, so HAVE (a stat, no read) may still say yes, but what is read is not the
    # block and nothing is sent. (The sync engine's own stat cache misses it as well.)
    info = os.stat(synced.file)
    with open(synced.file, "r+b") as handle:
        handle.write(b"\0" * 4096)
    os.utime(synced.file, ns=(info.st_atime_ns, info.st_mtime_ns))
    status, body = client.block(remote.grants[0], first)
    assert status == 404 and json.loads(body)["reason"] == "not_held"
    # Appended to: the stat differs; neither HAVE nor BLOCK (until a new version).
    with open(synced.file, "ab") as handle:
        handle.write(b"more")
    assert client.have(remote.grants, remote.ids) == (200, {"have": []})
    status, _ = client.block(remote.grants[0], remote.ids[1])
    assert status == 404
    blocks, _ = served(synced.a.home)
    assert blocks == 0


def test_refusals_serve_nothing(synced: SyncSetup, tmp_path: Path) -> None:
    appliance, b, remote = synced.appliance, synced.b, synced.remote
    port, first = synced.port, remote.ids[0]
    b_id = identity_of(b.home)
    client = client_of(b.home, port)
    wait_for(lambda: client.have(remote.grants, remote.ids)[1] == {"have": remote.ids},
             30, "A to hold the blocks")

    # No grant; an expired one (signed by the appliance's own key).
    assert refusal(*client.post(PEER_BLOCK_PATH, {"id": first})) == "no_grant"
    assert refusal(*client.post(PEER_HAVE_PATH, {"grants": [], "ids": [first]})) == \
        "no_grant"
    expired = appliance_grant(appliance, b_id, remote.ids, int(time.time()) - 1)
    assert refusal(*client.block(expired, first)) == "expired"
    # B's grant with its signature replaced.
    assert refusal(*client.block(remote.grants[0].rsplit(".", 1)[0] + ".AAAA", first)) \
        == "forged"

    # Another device of the same user, with B's grant: bound to B's key.
    c = make_device(tmp_path, appliance.url, synced.alice.code(), "c")
    c_client = client_of(c.home, port)
    assert refusal(*c_client.block(remote.grants[0], first)) == "other_device"
    # ... and with its own grant, served; then revoked: refused once the list reached A.
    c_grants = fetched(c.home, "/big.bin").grants
    assert c_client.block(c_grants[0], first)[0] == 200
    c_device = AgentHome(c.home).load_device().device_id
    revoked = run_cairnd("device", "revoke", c_device, "--home", appliance.home)
    assert revoked.returncode == 0, revoked.stderr
    answers: list[int] = []

    def refused_now() -> bool:
        answers.append(client_of(c.home, port).block(c_grants[0], first)[0])
        return answers[-1] == 403

    wait_for(refused_now, 60, "the revocation to reach the peer", every=0.2)
    polled_before_revoked = answers.count(200)
    assert set(answers) <= {200, 403}
    assert refusal(*client_of(c.home, port).block(c_grants[0], first)) == "revoked"

    # A device of another user, holding a real grant for these very blocks (the file was
    # shared with that user): refused for being another user's.
    bob = make_user(appliance, "bob")
    bob_home = make_device(tmp_path, appliance.url, bob.code(), "bob").home
    shared = run_cairn(synced.a.home, "share", "/big.bin", bob.name)
    assert shared.returncode == 0, shared.stderr
    bobs = fetched(bob_home, f"id:{remote.node_id}")
    assert bobs.ids == remote.ids and bobs.grants
    assert refusal(*client_of(bob_home, port).block(bobs.grants[0], first)) == "other_user"

    # No certificate, or one it signed itself (naming B): the handshake fails.
    ca_pem = b_id.ca_certificate_pem
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=ca_pem.decode())
    handshake_refused(port, bare)
    handshake_refused(port, self_signed_context(b_id.me.device_id, b_id.me.user_tag,
                                                b_id.me.appliance_id, ca_pem, tmp_path))

    blocks, refusals = settled_counters(
        synced.a.home, lambda _, r: r.get("handshake", 0) >= 2 and "other_user" in r)
    # C's blocks before it was revoked (asked until the revocation arrived), nothing since.
    assert blocks == 1 + polled_before_revoked
    assert refusals.pop("revoked") >= 2
    assert refusals == {"no_grant": 2, "expired": 1, "forged": 1, "other_device": 1,
                        "other_user": 1, "handshake": 2}
    log = synced.a.log_text()
    assert "peer request refused (other_user)" in log
    assert synced.data[:32].hex() not in log


# --- a drive's cache ------------------------------------------------------------------

def test_a_drive_serves_its_cached_blocks(appliance: Served, tmp_path: Path,
                                          drives: Callable[..., Any]) -> None:
    alice = make_user(appliance, "drive")
    a, b = devices_of(alice, tmp_path, "a", "b")
    with_peers(a)
    data = os.urandom(5 * 1024 * 1024)
    source = tmp_path / "photo.raw"
    source.write_bytes(data)
    put = run_cairn(b.home, "put", str(source), "/photo.raw")
    assert put.returncode == 0, put.stderr
    drive = drives(a.home, tmp_path / "mnt").start()
    status = peer_status(a.home)
    remote = fetched(b.home, "/photo.raw")
    client = client_of(b.home, int(status["port"]))
    assert client.have(remote.grants, remote.ids) == (200, {"have": []})
    assert (tmp_path / "mnt" / "photo.raw").read_bytes() == data   # now in A's cache
    assert client.have(remote.grants, remote.ids) == (200, {"have": remote.ids})
    for ref in remote.refs:
        status_code, body = client.block(covering(remote.grants, ref.id_hex,
                                                  identity_of(b.home)), ref.id_hex)
        assert status_code == 200 and blake3.blake3(body).hexdigest() == ref.id_hex
        decrypt_block(ref, body)
    settled_counters(a.home, lambda n, _: n == len(remote.refs))
    assert drive.stop() == 0
    assert "peers: stopped" in drive.log_text()
    assert read_statuses(AgentHome(a.home)) == []


def test_no_peers_and_the_config_turn_it_off(appliance: Served, tmp_path: Path) -> None:
    alice = make_user(appliance, "off")
    [a] = devices_of(alice, tmp_path, "a")
    with_peers(a)
    done = run_cairn(a.home, "sync", str(a.folder), "--once", "--no-peers")
    assert done.returncode == 0, done.stderr
    assert "peers:" not in done.stderr
    (a.home / "config.toml").write_text(LOOPBACK_PEERS.replace("loopback = true",
                                                               "enabled = false"))
    done = run_cairn(a.home, "sync", str(a.folder), "--once", "-v")
    assert done.returncode == 0 and "peers: serving" not in done.stderr, done.stderr
    (a.home / "config.toml").write_text("[peers]\nport = 'x'\n")
    done = run_cairn(a.home, "sync", str(a.folder), "--once")
    assert done.returncode == 0, done.stderr
    assert "peers off: " in done.stderr and "peers.port" in done.stderr


# --- the mDNS record on a LAN ---------------------------------------------------------

INSTANCE = r"[0-9a-f]{16}"
PEER_NAMES = (re.compile(r"_cairn-peer\._tcp\.local\."),
              re.compile(INSTANCE + r"\._cairn-peer\._tcp\.local\."),
              re.compile(r"cairn-peer-" + INSTANCE + r"\.local\."))


TYPES = {1: "a", 12: "ptr", 16: "txt", 33: "srv", 47: "nsec", 28: "aaaa"}


def records_of(packet: bytes) -> list[tuple[str, str, Any]]:
    """(type, name, value) of every question and record of an mDNS PACKET."""
    from zeroconf._protocol.incoming import DNSIncoming

    incoming = DNSIncoming(packet)
    assert incoming.valid, packet.hex()
    found: list[tuple[str, str, Any]] = [("question", q.name, None)
                                         for q in incoming.questions]
    for record in incoming.answers():
        kind = TYPES.get(record.type, str(record.type))
        value: Any = None
        if kind == "a":
            value = socket.inet_ntoa(getattr(record, "address"))  # noqa: B009
        elif kind == "ptr":
            value = getattr(record, "alias")  # noqa: B009
        elif kind == "txt":
            value = getattr(record, "text")  # noqa: B009
        elif kind == "srv":
            value = (getattr(record, "server"), getattr(record, "port"))  # noqa: B009
        found.append((kind, record.name, value))
    return found


def txt_pairs(raw: bytes) -> dict[str, str]:
    """A TXT record's strings (length-prefixed) as key=value pairs."""
    pairs, at = {}, 0
    while at < len(raw):
        length = raw[at]
        key, _, value = raw[at + 1:at + 1 + length].decode().partition("=")
        pairs[key] = value
        at += 1 + length
    return pairs


@pytest.mark.slow
def test_the_peer_record_names_nobody_and_the_other_device_finds_it(tmp_path: Path
                                                                     ) -> None:
    from lan_helpers import three_hosts
    from netns_helpers import in_netns, netns_available, read_json_line, reap

    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    user = "peeruser"
    with three_hosts(tmp_path) as net:
        a = net.device("dva", "alices-desk", net.add_user(user))
        b = net.device("dvb", "alices-laptop", net.new_code(user))
        # Everything the devices send on B's wire from before they start until both
        # found each other (the capture runs until its stdin is closed).
        capture = subprocess.Popen(
            in_netns(net.netns("dvb"), sys.executable, __file__, "capture", "120",
                     b.address), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert read_json_line(capture, 10) == {"listening": True}
            for device in (a, b):
                (tmp_path / f"{device.name}-dir").mkdir()
                device.start("sync", tmp_path / f"{device.name}-dir", "-v")
            statuses = {}
            for device in (a, b):
                def ready(home: Path = device.home) -> list[dict[str, Any]]:
                    return [s for s in read_statuses(AgentHome(home))
                            if s["peers"] >= 1 and s["advertised"]]

                statuses[device.name] = wait_for(ready, 60, f"{device.name} to advertise "
                                                 "and find the other")[0]
            time.sleep(1.0)      # the answers to the last queries
        finally:
            out, _ = reap(capture, timeout=20)
        assert statuses["alices-desk"]["addresses"] == [a.address]
        assert statuses["alices-laptop"]["addresses"] == [b.address]
        packets = [(p["from"], bytes.fromhex(p["data"]))
                   for p in json.loads(out.strip().splitlines()[-1])["packets"]]
        appliance_id = net.appliance_id

    # Who must not show: the user, both devices' names and ids, the appliance, the
    # user's tag in the certificates, the account's token.
    secrets = [user, "alices", "desk", "laptop", appliance_id]
    for device in (a, b):
        record = AgentHome(device.home).load_device()
        me = identity_of(device.home).me
        secrets += [record.device_id, record.token, me.user_tag, me.device_id]
    from_devices = [data for sender, data in packets if sender in (a.address, b.address)]
    assert from_devices, packets
    seen: dict[str, set[str]] = {}
    for data in from_devices:
        lowered = data.lower()
        for secret in secrets:
            assert secret.lower().encode() not in lowered, (secret, data)
        for kind, name, value in records_of(data):
            assert any(pattern.fullmatch(name) for pattern in PEER_NAMES), (kind, name)
            seen.setdefault(kind, set()).add(name)
            if kind == "txt":
                assert txt_pairs(value) == {"v": "1"}
            elif kind == "ptr":
                assert PEER_NAMES[1].fullmatch(value), value
            elif kind == "srv":
                assert PEER_NAMES[2].fullmatch(value[0]), value
            elif kind == "a":
                assert value in (a.address, b.address), value
    # Both devices' records went out whole (announced or answered).
    assert {"ptr", "srv", "txt", "a"} <= set(seen), seen
    instances = {name.split(".")[0] for name in seen["srv"]}
    assert instances == {statuses["alices-desk"]["instance"],
                         statuses["alices-laptop"]["instance"]}



def _capture(seconds: float, address: str) -> None:
    """Print every mDNS packet heard on ADDRESS's interface until stdin is closed (at
    most SECONDS): one JSON line when listening, one with the packets (hex) at the end."""
    import select

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("224.0.0.251") + socket.inet_aton(address))
    print(json.dumps({"listening": True}), flush=True)
    packets = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([sock, sys.stdin], [], [], left)
        if sock in ready:
            data, sender = sock.recvfrom(9000)
            packets.append({"from": sender[0], "data": data.hex()})
        if sys.stdin in ready and not sys.stdin.read(1):
            break
    print(json.dumps({"packets": packets}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        _capture(float(sys.argv[2]), sys.argv[3])
