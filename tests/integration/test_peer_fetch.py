"""The fetch policy end to end, on 127.0.0.1 with peers on loopback (CAIRN_PEERS=loopback):
a real appliance; device A runs `cairn sync` on a folder holding a file (its peer service
serves the file's blocks, re-encrypted from the synced file); device B runs `cairn get`.

Faults come from peers the test runs itself: the real peer server (agent/peers/server.py)
with the real certificate of a third device C of the same user, advertised on loopback
like any peer, whose block source lies (one byte flipped in the real ciphertext) or
stalls (answers HAVE, then never sends a block)."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import CAIRN, User, agent_env, cairn_ok, ls_json, make_user, run_cairn
from cairnd_helpers import Served, run_cairnd
from drive_helpers import Drive
from sync_helpers import wait_for
from zeroconf import ServiceInfo, Zeroconf

from agent.crypto.blocks import BLOCK_SIZE, encrypt_block
from agent.home import AgentHome
from agent.peers import advertise, peer_client
from agent.peers.identity import PeerIdentity, load_identity
from agent.peers.server import PeerServer, Us
from agent.peers.service import read_statuses
from protocol.peers import GRANT_LIFETIME_S, new_instance_id

BLOCKS = 10
PEER_ENV = {"CAIRN_PEERS": "loopback"}
FROM_PEERS = re.compile(r"fetched (\d+) of (\d+) blocks(?:, (\d+) from peers)?")


@dataclass
class Shared:
    user: User
    a_home: Path
    b_home: Path
    c_home: Path
    data: bytes
    ciphertexts: dict[str, bytes]
    a_sync: subprocess.Popen[bytes] | None = None


def _start_sync(home: Path, folder: Path) -> subprocess.Popen[bytes]:
    log = open(home / "sync.log", "ab")  # noqa: SIM115 — the child keeps it
    try:
        return subprocess.Popen([*CAIRN, "--home", str(home), "sync", str(folder), "-v"],
                                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env=agent_env(**PEER_ENV))
    finally:
        log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def shared(appliance: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    base = tmp_path_factory.mktemp("peer-fetch")
    user = make_user(appliance, "peers")
    assert user.keys is not None
    homes = [user.join(base / f"{name}-home", name) for name in ("a", "b", "c")]
    for home in homes:
        assert load_identity(AgentHome(home)) is not None, "no device certificate at join"
    data = os.urandom(BLOCKS * BLOCK_SIZE - 12345)
    ciphertexts = {}
    for start in range(0, len(data), BLOCK_SIZE):
        ref, cipher = encrypt_block(user.keys.content_secret, data[start:start + BLOCK_SIZE])
        ciphertexts[ref.id_hex] = cipher
    folder = base / "a-folder"
    folder.mkdir()
    (folder / "big.bin").write_bytes(data)
    state = Shared(user, homes[0], homes[1], homes[2], data, ciphertexts)
    state.a_sync = _start_sync(homes[0], folder)
    try:
        wait_for(lambda: any(e["name"] == "big.bin" and e["status"] == "uploaded"
                             for e in ls_json(homes[1])), timeout=60, what="A's upload")
        wait_for(lambda: any(s.get("advertised") for s in read_statuses(AgentHome(homes[0]))),
                 timeout=30, what="A's peer service advertised")
        yield state
    finally:
        _stop(state.a_sync)


def _get(home: Path, out: Path, *extra: str) -> tuple[int, int, float, str]:
    """B's `cairn get /big.bin OUT` with peers on loopback: (blocks fetched, from peers,
    seconds, stderr)."""
    started = time.monotonic()
    result = run_cairn(home, "get", *extra, "/big.bin", out, env=agent_env(**PEER_ENV),
                       timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    found = FROM_PEERS.search(result.stdout)
    assert found, result.stdout
    return int(found[1]), int(found[3] or 0), took, result.stderr


def _same(path: Path, data: bytes) -> bool:
    return hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


# --- a peer the test runs ----------------------------------------------------------------

class FaultySource:
    """Holds every block of the file; LIE: sends its ciphertext with one byte flipped;
    STALL: never sends (waits until released)."""

    def __init__(self, ciphertexts: dict[str, bytes], *, lie: bool = False,
                 stall: bool = False) -> None:
        self.ciphertexts = ciphertexts
        self.lie = lie
        self.stall = stall
        self.release = threading.Event()
        self.reads = 0

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        return [b for b in block_ids if b in self.ciphertexts]

    def read(self, block_id: str) -> bytes | bytearray | None:
        self.reads += 1
        if self.stall:
            self.release.wait(60)
            return None
        data = bytearray(self.ciphertexts[block_id])
        if self.lie:
            data[len(data) // 2] ^= 0x01
        return data


@dataclass
class FaultyPeer:
    identity: PeerIdentity
    server: PeerServer
    source: FaultySource


@pytest.fixture
def faulty_peer(shared: Shared) -> Iterator[Callable[..., FaultyPeer]]:
    """A factory for a peer served by this test with device C's real certificate (or
    that of the device in HOME), advertised on loopback; everything is stopped at the
    end."""
    running: list[tuple[PeerServer, FaultySource, Zeroconf, ServiceInfo]] = []

    def start(home: Path | None = None, **faults: bool) -> FaultyPeer:
        identity = load_identity(AgentHome(home or shared.c_home))
        assert identity is not None
        source = FaultySource(shared.ciphertexts, **faults)
        us = Us(identity.me.appliance_id, identity.me.user_tag, identity.ca_public_key())
        server = PeerServer(identity.server_context(), us, source, lambda device: False)
        server.listen(["127.0.0.1"], 0)
        server.start()
        instance = advertise.open_zeroconf([advertise.PeerAddress("lo", "127.0.0.1")])
        info = advertise.peer_service_info(new_instance_id(), server.port, ["127.0.0.1"])
        advertise.register(instance, info)
        running.append((server, source, instance, info))
        return FaultyPeer(identity, server, source)

    try:
        yield start
    finally:
        for server, source, instance, info in running:
            source.release.set()
            advertise.close(instance, info)
            server.stop()


# --- the tests -----------------------------------------------------------------------------

def test_a_get_comes_mostly_from_the_peer_that_holds_the_file(shared: Shared,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "from-peers.bin"
    fetched, from_peers, took, _ = _get(shared.b_home, out)
    assert _same(out, shared.data)
    assert fetched == BLOCKS
    # On 127.0.0.1 the appliance is as fast as the peer (both CPU-bound), so the plan
    # splits about evenly (5 of 10 in every run seen); a faster peer getting nearly all
    # (a 100 Mbit/s appliance: 5 of 256 blocks from it) is test_peers_lan.py's Show.
    assert from_peers >= BLOCKS // 4, (from_peers, took)
    # A's own counters (its status file is rewritten every second) saw them go out.
    wait_for(lambda: sum(s["served_blocks"] for s in read_statuses(AgentHome(shared.a_home)))
             >= from_peers, timeout=10, what="A's counters")


def test_no_peers_fetches_everything_from_the_appliance(shared: Shared,
                                                        tmp_path: Path) -> None:
    before = sum(s["served_blocks"] for s in read_statuses(AgentHome(shared.a_home)))
    out = tmp_path / "alone.bin"
    fetched, from_peers, _, _ = _get(shared.b_home, out, "--no-peers")
    assert _same(out, shared.data)
    assert (fetched, from_peers) == (BLOCKS, 0)
    after = sum(s["served_blocks"] for s in read_statuses(AgentHome(shared.a_home)))
    assert after == before


def test_a_peer_sending_wrong_bytes_is_dropped_and_the_file_is_right(
        shared: Shared, faulty_peer: Callable[..., FaultyPeer], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    liar = faulty_peer(lie=True)
    out = tmp_path / "despite-liar.bin"
    with caplog.at_level(logging.INFO, logger="cairn.peers"):
        fetched, _, _, _ = _get(shared.b_home, out)
    assert _same(out, shared.data)
    assert fetched == BLOCKS
    assert liar.source.reads >= 1, "the liar was never asked: the test proves nothing"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "wrong bytes" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]   # once a peer
    assert liar.identity.me.device_id in warnings[0].getMessage()
    # Dropped at the first lie: never asked for a block again in this transfer (the
    # blocks already in flight to it, at most its cap of 4, may still come back wrong).
    assert liar.source.reads <= 4


def test_a_peer_that_stalls_costs_seconds_not_the_transfer(
        shared: Shared, faulty_peer: Callable[..., FaultyPeer], tmp_path: Path) -> None:
    staller = faulty_peer(stall=True)
    out = tmp_path / "despite-staller.bin"
    fetched, _, took, _ = _get(shared.b_home, out)
    assert _same(out, shared.data)
    assert fetched == BLOCKS
    assert staller.source.reads >= 1, "the staller was never asked: the test proves nothing"
    # A short browse (1.5 s), then the read timeout (3 s) at most once per stalled
    # request; generous for a machine shared by several test runs.
    assert took < 25, took


def test_cairn_get_without_grants_or_identity_just_uses_the_appliance(
        shared: Shared, tmp_path: Path) -> None:
    home = AgentHome(shared.b_home)
    key = home.path / "device-cert.pem"
    saved = key.read_bytes()
    key.unlink()
    try:
        out = tmp_path / "no-identity.bin"
        fetched, from_peers, _, _ = _get(shared.b_home, out)
    finally:
        key.write_bytes(saved)
        os.chmod(key, 0o600)
    assert _same(out, shared.data)
    assert (fetched, from_peers) == (BLOCKS, 0)
    assert cairn_ok(shared.b_home, "ls", "/")


def _served_by_a(shared: Shared) -> int:
    return sum(s["served_blocks"] for s in read_statuses(AgentHome(shared.a_home)))


def test_a_sync_downloads_through_its_own_peer_service(shared: Shared,
                                                       tmp_path: Path) -> None:
    home = shared.user.join(tmp_path / "s-home", "s")
    folder = tmp_path / "s-folder"
    folder.mkdir()
    before = _served_by_a(shared)
    process = _start_sync(home, folder)
    try:
        wait_for(lambda: (folder / "big.bin").exists(), timeout=60, what="S's download")
        assert _same(folder / "big.bin", shared.data)
        # A served part of it (its status file is rewritten every second).
        wait_for(lambda: _served_by_a(shared) - before >= BLOCKS // 4, timeout=10,
                 what=f"A serving S (served {_served_by_a(shared) - before})")
    finally:
        _stop(process)


@pytest.mark.root
def test_the_drive_reads_blocks_from_a_peer(shared: Shared, tmp_path: Path,
                                            drives: Callable[..., Drive]) -> None:
    home = shared.user.join(tmp_path / "d-home", "d")
    (home / "config.toml").write_text("[peers]\nloopback = true\n")
    drive = drives(home, tmp_path / "mnt").start()
    # The drive's peer service finds A by mDNS; reads then ask A first.
    wait_for(lambda: any(s.get("peers") for s in read_statuses(AgentHome(home))),
             timeout=30, what="the drive's peer service finding A")
    before = _served_by_a(shared)
    assert _same(drive.mountpoint / "big.bin", shared.data)
    wait_for(lambda: _served_by_a(shared) - before >= BLOCKS // 4, timeout=10,
             what=f"A serving the drive (served {_served_by_a(shared) - before})")


def test_grants_about_to_expire_are_renewed_and_the_peer_kept(
        shared: Shared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download longer than a grant's life (15 min) renews its grants with the URLs.
    The time cannot pass here: the margin is widened instead, so every grant looks about
    to expire and every block asked of a peer renews them first."""
    import agent.download

    renewals = []
    index = peer_client.index_grants

    def counting(*args: Any) -> tuple[dict[str, str], float]:
        renewals.append(1)
        return index(*args)

    monkeypatch.setattr(agent.download, "GRANT_MARGIN_S", GRANT_LIFETIME_S)
    monkeypatch.setattr(agent.download, "index_grants", counting)
    out = tmp_path / "renewed.bin"
    fetched, from_peers, _, _ = _get(shared.b_home, out)
    assert _same(out, shared.data)
    assert fetched == BLOCKS and from_peers >= 1
    assert len(renewals) >= 1 + from_peers      # the first index, then one per peer block


def test_a_revoked_peer_is_never_asked(shared: Shared, faulty_peer: Callable[..., FaultyPeer],
                                       appliance: Served, tmp_path: Path) -> None:
    home = shared.user.join(tmp_path / "r-home", "r")
    revoked = faulty_peer(home)                     # honest: it would serve every block
    device_id = revoked.identity.me.device_id
    result = run_cairnd("device", "revoke", device_id, "--home", appliance.home)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "not-from-revoked.bin"
    fetched, _, _, _ = _get(shared.b_home, out)
    assert _same(out, shared.data) and fetched == BLOCKS
    assert revoked.source.reads == 0
    assert revoked.server.counters.have_requests == 0     # not even asked what it holds
