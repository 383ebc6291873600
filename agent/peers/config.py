"""The agent's own settings for LAN peers: the `[peers]` section of HOME/config.toml.

    [peers]
    enabled = true          # serve and fetch blocks among this user's devices on the LAN
    loopback = false        # also on loopback (tests; a machine running several agents)
    port = 0                # the port the peer service listens on; 0 = any free port
    interfaces = []         # interface names; [] = every non-loopback interface that is up

The file is optional, and so is every key: an absent one takes the default above. It is
read with tomllib; a value of the wrong kind, or a key this agent does not know in
`[peers]` (a typo would otherwise be silently ignored), is a PeerError naming the file and
the key, one line. Other sections of the file belong to whoever reads them and are left
alone here.

The environment variable CAIRN_PEERS overrides the file, for tests and for a quick
experiment: `off` (peers disabled), `on` (enabled, LAN only) or `loopback` (enabled, and
on loopback too). Why loopback is off by default: peers are other machines; two agents on
one machine share its page cache and gain nothing from each other, except in tests.

`parse_peers_config` is the pure core (a mapping and the environment's value in, a
PeersConfig out); `load_peers_config` reads the file and the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import PeerError
from agent.home import AgentHome

CONFIG_FILE = "config.toml"
SECTION = "peers"
PEERS_ENV = "CAIRN_PEERS"
ENV_VALUES = ("off", "on", "loopback")
# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash, no white space.
INTERFACE_NAME = re.compile(r"[^\s/]{1,15}")


@dataclass(frozen=True)
class PeersConfig:
    enabled: bool = True
    loopback: bool = False
    port: int = 0
    interfaces: tuple[str, ...] = ()


def _bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PeerError(f"{where}: peers.{key} must be true or false, not {value!r}")
    return value


def parse_peers_config(data: Mapping[str, Any], env: str | None = None, *,
                       where: str = CONFIG_FILE) -> PeersConfig:
    """The settings DATA (a parsed config.toml) holds, overridden by ENV (the value of
    CAIRN_PEERS, if set). WHERE names the file in messages."""
    section = data.get(SECTION, {})
    if not isinstance(section, Mapping):
        raise PeerError(f"{where}: [{SECTION}] must be a table")
    unknown = sorted(set(section) - {"enabled", "loopback", "port", "interfaces"})
    if unknown:
        raise PeerError(f"{where}: unknown setting peers.{unknown[0]} (known: enabled, "
                        "loopback, port, interfaces)")
    default = PeersConfig()
    enabled = _bool(where, "enabled", section.get("enabled", default.enabled))
    loopback = _bool(where, "loopback", section.get("loopback", default.loopback))
    port = section.get("port", default.port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise PeerError(f"{where}: peers.port must be a port number 0-65535 (0: any free "
                        f"one), not {port!r}")
    interfaces = section.get("interfaces", list(default.interfaces))
    if not isinstance(interfaces, list) or not all(
            isinstance(name, str) and INTERFACE_NAME.fullmatch(name) for name in interfaces):
        raise PeerError(f"{where}: peers.interfaces must be a list of interface names "
                        f"like [\"eth0\"], not {interfaces!r}")
    if env is not None:
        choice = env.strip().lower()
        if choice not in ENV_VALUES:
            raise PeerError(f"{PEERS_ENV}={env!r}: say one of {', '.join(ENV_VALUES)}")
        enabled = choice != "off"
        loopback = choice == "loopback"
    return PeersConfig(enabled=enabled, loopback=loopback, port=port,
                       interfaces=tuple(dict.fromkeys(interfaces)))


def load_peers_config(home: AgentHome) -> PeersConfig:
    """HOME's peer settings (HOME/config.toml, then CAIRN_PEERS); the defaults if there
    is no file. Raises PeerError for a file that cannot be read or a bad value."""
    path = home.path / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except (OSError, UnicodeDecodeError) as exc:
        raise PeerError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PeerError(f"{path} is not valid TOML: {exc}") from None
    return parse_peers_config(data, os.environ.get(PEERS_ENV), where=str(path))
