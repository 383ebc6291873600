"""The peer client's pure parts: which grants a download may use, how HAVE is batched,
and which peers are never asked (agent/peers/peer_client.py)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.peers.identity import CertifiedDevice, PeerIdentity
from agent.peers.peer_client import (
    GRANT_MARGIN_S,
    HAVE_MAX_GRANTS,
    have_batches,
    index_grants,
    is_trusted,
)
from protocol.peers import PEER_HAVE_MAX_IDS, Grant, chunk_blocks, sign_grant

ME = CertifiedDevice("dev_me", "user_1", "app_1", "ab" * 32, 2_000_000_000)


def ids(n: int, start: int = 0) -> list[str]:
    return [f"{i:064x}" for i in range(start, start + n)]


def test_have_batches_hold_at_most_the_limits_and_only_granted_blocks() -> None:
    blocks = ids(3000)
    grant_of = {block: f"grant-{i // 64}" for i, block in enumerate(blocks[:2900])}
    batches = have_batches(blocks + blocks[:10], grant_of)
    asked = [block for _, batch in batches for block in batch]
    assert asked == blocks[:2900]                       # once each, in order
    for grants, batch in batches:
        assert len(batch) <= PEER_HAVE_MAX_IDS and len(grants) <= HAVE_MAX_GRANTS
        assert {grant_of[b] for b in batch} == set(grants)
    assert have_batches(blocks, {}) == []


def test_have_batches_start_anew_when_the_grants_run_out() -> None:
    blocks = ids(40)
    grant_of = {block: f"g{i}" for i, block in enumerate(blocks)}   # a grant each
    batches = have_batches(blocks, grant_of)
    assert [len(batch) for _, batch in batches] == [16, 16, 8]


@pytest.mark.parametrize(("device", "why"), [
    (CertifiedDevice("dev_b", "user_1", "app_1", "cd" * 32, 0), None),
    (CertifiedDevice("dev_b", "user_2", "app_1", "cd" * 32, 0), "another user"),
    (CertifiedDevice("dev_b", "user_1", "app_2", "cd" * 32, 0), "another appliance"),
    (CertifiedDevice("dev_me", "user_1", "app_1", "ab" * 32, 0), "itself"),
    (CertifiedDevice("dev_gone", "user_1", "app_1", "cd" * 32, 0), "revoked"),
])
def test_who_is_never_asked(device: CertifiedDevice, why: str | None) -> None:
    verdict = is_trusted(device, ME, lambda device_id: device_id == "dev_gone")
    assert (verdict is None) if why is None else (verdict is not None and why in verdict)


class _Identity:
    """What index_grants reads of a PeerIdentity."""

    def __init__(self, key: Ed25519PrivateKey, me: CertifiedDevice) -> None:
        self._key = key
        self.me = me

    def ca_public_key(self) -> object:
        return self._key.public_key()


def _grant(key: Ed25519PrivateKey, blocks: list[str], *, device: str = "dev_me",
           expires: float | None = None) -> str:
    return sign_grant(key, Grant("app_1", device, ME.key_sha256, "user_1",
                                 int(expires or time.time() + 900), frozenset(blocks)))


def test_index_grants_keeps_only_ours_valid_and_unexpired() -> None:
    ca, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    identity = _Identity(ca, ME)
    now = time.time()
    good = [_grant(ca, chunk) for chunk in chunk_blocks(ids(100))]
    tokens = [*good,
              _grant(other, ids(5, 200)),                             # another CA
              _grant(ca, ids(5, 300), device="dev_other"),            # another device
              _grant(ca, ids(5, 400), expires=now + GRANT_MARGIN_S / 2),   # expiring
              "cg1.not.a-grant"]
    covering, first_expiry = index_grants(tokens, identity, now)   # type: ignore[arg-type]
    assert set(covering) == set(ids(100))
    assert covering[ids(1)[0]] == good[0] and covering[ids(1, 99)[0]] == good[1]
    assert now + 800 < first_expiry <= now + 901
    assert index_grants([], identity, now) == ({}, float("inf"))   # type: ignore[arg-type]


def test_identity_protocol_matches() -> None:
    # _Identity stands in for PeerIdentity above: keep their shared surface honest.
    assert "me" in {field.name for field in dataclasses.fields(PeerIdentity)}
    assert callable(PeerIdentity.ca_public_key)
