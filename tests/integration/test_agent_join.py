"""`cairn join` at the production scrypt cost, end to end: every other test's users have
their key bundle sealed cheaply by the harness (agent_helpers.make_user), so this one
proves that a first device — the real binary — seals the user's keys at SCRYPT_LOG2_N,
and that a second device opens that bundle and sees the same tree."""

from __future__ import annotations

from pathlib import Path

from agent_helpers import MakeUser, agent_env, cairn_ok, ls_json, run_cairn_binary
from cairnd_helpers import Served, database_rows

from agent.crypto.keys import BUNDLE_MAGIC, SCRYPT_LOG2_N


def stored_bundle(appliance: Served, user: str) -> bytes:
    [(bundle,)] = database_rows(appliance.config,
                                "SELECT key_bundle FROM users WHERE name = ?", user)
    return bytes(bundle)


def test_a_first_join_seals_the_keys_at_the_production_cost(
        appliance: Served, fresh_user: MakeUser, tmp_path: Path) -> None:
    alice = fresh_user("alice", keys=False)
    first = run_cairn_binary(
        tmp_path / "laptop", "join", alice.code(), "--url", appliance.url, "--name", "laptop",
        env=agent_env(CAIRN_PASSPHRASE="a passphrase of the production kind"))
    assert first.returncode == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert "made your keys" in first.stdout

    bundle = stored_bundle(appliance, alice.name)
    assert bundle.startswith(BUNDLE_MAGIC)
    assert bundle[len(BUNDLE_MAGIC) + 1] == SCRYPT_LOG2_N == 17

    (tmp_path / "note.txt").write_text("from the laptop")
    cairn_ok(tmp_path / "laptop", "put", tmp_path / "note.txt", "/note.txt")
    phone = alice.join(tmp_path / "phone", "phone",
                       passphrase="a passphrase of the production kind")
    assert [e["name"] for e in ls_json(phone)] == ["note.txt"]
    assert stored_bundle(appliance, alice.name) == bundle   # opened, not sealed again
