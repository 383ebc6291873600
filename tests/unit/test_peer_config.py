"""The `[peers]` config (agent/peers/config.py) and the revocation list's holder
(agent/peers/revocation.py), without an appliance."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.errors import PeerError
from agent.home import AgentHome
from agent.peers.config import PeersConfig, load_peers_config, parse_peers_config
from agent.peers.revocation import RevocationList


def test_defaults_without_a_file_or_a_section(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAIRN_PEERS", raising=False)
    assert load_peers_config(AgentHome(tmp_path)) == PeersConfig(True, False, 0, ())
    assert parse_peers_config({"other": {"x": 1}}) == PeersConfig()


def test_the_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAIRN_PEERS", raising=False)
    (tmp_path / "config.toml").write_text(
        '[peers]\nenabled = false\nloopback = true\nport = 4711\n'
        'interfaces = ["eth0", "wlan0", "eth0"]\n')
    assert load_peers_config(AgentHome(tmp_path)) == \
        PeersConfig(False, True, 4711, ("eth0", "wlan0"))


@pytest.mark.parametrize("section, words", [
    ({"enabled": "yes"}, "peers.enabled must be true or false"),
    ({"loopback": 1}, "peers.loopback must be true or false"),
    ({"port": 70000}, "peers.port must be a port number"),
    ({"port": True}, "peers.port must be a port number"),
    ({"port": "80"}, "peers.port must be a port number"),
    ({"interfaces": "eth0"}, "peers.interfaces must be a list"),
    ({"interfaces": ["a/b"]}, "peers.interfaces must be a list"),
    ({"interfaces": ["x" * 16]}, "peers.interfaces must be a list"),
    ({"enable": True}, "unknown setting peers.enable"),
])
def test_bad_values_are_named(section: dict[str, Any], words: str) -> None:
    with pytest.raises(PeerError, match=words) as caught:
        parse_peers_config({"peers": section}, where="/h/config.toml")
    assert caught.value.message.startswith("/h/config.toml: ")
    assert "\n" not in caught.value.message


def test_a_section_that_is_not_a_table_or_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(PeerError, match=r"\[peers\] must be a table"):
        parse_peers_config({"peers": 3})
    (tmp_path / "config.toml").write_text("[peers\n")
    with pytest.raises(PeerError, match="not valid TOML"):
        load_peers_config(AgentHome(tmp_path))


@pytest.mark.parametrize("env, enabled, loopback", [
    ("off", False, False), ("on", True, False), ("loopback", True, True),
    (" LOOPBACK ", True, True)])
def test_the_environment_overrides_the_file(env: str, enabled: bool, loopback: bool) -> None:
    config = parse_peers_config({"peers": {"enabled": not enabled, "port": 9}}, env)
    assert (config.enabled, config.loopback, config.port) == (enabled, loopback, 9)


def test_a_bad_environment_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_PEERS", "maybe")
    with pytest.raises(PeerError, match="CAIRN_PEERS='maybe'"):
        load_peers_config(AgentHome(tmp_path))


# --- the revocation list ----------------------------------------------------------------


def test_replace_ignores_an_older_answer() -> None:
    revocations = RevocationList()
    assert not revocations.is_revoked("d1")
    revocations.replace(["d1", "d2"], as_of=20.0)
    revocations.replace(["d1"], as_of=10.0)       # an older read that came in late
    assert revocations.is_revoked("d2") and revocations.as_of == 20.0
    revocations.replace(["d3"], as_of=30.0)
    assert revocations.revoked == {"d3"}


def test_is_revoked_from_threads_while_the_list_changes() -> None:
    revocations = RevocationList(["base"])
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        for _ in range(20000):
            if not revocations.is_revoked("base"):
                errors.append("base vanished")
            if stop.is_set():
                return

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    for n in range(2000):
        revocations.replace(["base", f"d{n}"], as_of=float(n))
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert revocations.revoked == {"base", "d1999"}


def test_only_revoked_events_poke() -> None:
    async def main() -> None:
        revocations = RevocationList()
        revocations.on_event("heartbeat", {})
        assert not revocations._poked.is_set()
        revocations.on_event("revoked", {"count": 1})
        assert revocations._poked.is_set()

    trio.run(main)
