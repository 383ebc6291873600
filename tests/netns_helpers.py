"""Throwaway LANs in network namespaces, and processes that run inside them.

`lan(...)` builds, then always deletes, namespaces like these (SUFFIX is random, so parallel
runs do not clash)::

    cairn-br-SUFFIX:  br0 ── a0, b0        br1 ── a1, c1        (bridges, nothing else)
    cairn-a-SUFFIX:   eth0 10.77.0.1/24    eth1 10.78.0.1/24   (the peer ends of a0 and a1)
    cairn-b-SUFFIX:   eth0 10.77.0.2/24
    cairn-c-SUFFIX:   eth1 10.78.0.3/24

Every link is made inside the namespaces (`ip -n NS link add ... peer ... netns OTHER`), so
nothing is ever created in, or attached to, the machine's own network namespace. IPv6 is
switched off in them, and so are IGMP reports for link-local groups, so that an interface sends
nothing but what programs send through it (no router solicitation, no MLD or IGMP report): a
test can then read an interface's transmit counter to prove silence.

Run as a script inside a namespace (`ip netns exec NS python netns_helpers.py ...`), this file
is the test's advertiser or browser; each prints JSON lines on stdout.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HELPER = Path(__file__).resolve()


def netns_available() -> str | None:
    """Why namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"cairn-probe-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return None


def ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout


def _quiet(netns: str) -> None:
    """No IPv6, and no IGMP reports for link-local groups such as mDNS's 224.0.0.251: an
    interface then sends only what a program sends through it."""
    settings = [f"net.ipv6.conf.{key}.disable_ipv6=1" for key in ("all", "default", "lo")]
    settings.append("net.ipv4.igmp_link_local_mcast_reports=0")
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", *settings],
                   capture_output=True, timeout=10, check=True)


@dataclass(frozen=True)
class Host:
    netns: str
    addresses: dict[str, str]  # interface name → IPv4 address


@dataclass
class Lan:
    bridge_netns: str
    hosts: dict[str, Host] = field(default_factory=dict)

    def namespaces(self) -> list[str]:
        return [self.bridge_netns, *(h.netns for h in self.hosts.values())]

    def tx_packets(self, host: str, interface: str) -> int:
        """Packets the interface has sent (its kernel counter)."""
        stats = json.loads(ip("-s", "-j", "link", "show", interface,
                              netns=self.hosts[host].netns))
        return int(stats[0]["stats64"]["tx"]["packets"])


# (bridge, host, interface, address) for each wire of the picture in the module docstring.
WIRES = (
    ("br0", "a", "eth0", "10.77.0.1"),
    ("br0", "b", "eth0", "10.77.0.2"),
    ("br1", "a", "eth1", "10.78.0.1"),
    ("br1", "c", "eth1", "10.78.0.3"),
)


Wire = tuple[str, str, str, str]


@contextmanager
def lan(wires: Sequence[Wire] = WIRES) -> Iterator[Lan]:
    """The LAN of the module docstring, or the one WIRES describe: (bridge, host, interface,
    address) each. Keep host names short: HOST + the bridge's last character names the
    bridge's port, and interface names have at most 15 characters."""
    suffix = secrets.token_hex(3)
    built = Lan(bridge_netns=f"cairn-br-{suffix}")
    made: list[str] = []
    host_names = list(dict.fromkeys(host for _, host, _, _ in wires))
    try:
        for netns in [built.bridge_netns, *(f"cairn-{h}-{suffix}" for h in host_names)]:
            ip("netns", "add", netns)
            made.append(netns)
            _quiet(netns)
            ip("link", "set", "lo", "up", netns=netns)
        for bridge in dict.fromkeys(bridge for bridge, _, _, _ in wires):
            ip("link", "add", bridge, "type", "bridge", "mcast_snooping", "0",
               netns=built.bridge_netns)
            ip("link", "set", bridge, "up", netns=built.bridge_netns)
        addresses: dict[str, dict[str, str]] = {}
        for bridge, host, interface, address in wires:
            host_netns, port = f"cairn-{host}-{suffix}", f"{host}{bridge[-1]}"
            ip("link", "add", port, "type", "veth", "peer", "name", interface,
               "netns", host_netns, netns=built.bridge_netns)
            ip("link", "set", port, "master", bridge, "up", netns=built.bridge_netns)
            ip("addr", "add", f"{address}/24", "dev", interface, netns=host_netns)
            ip("link", "set", interface, "up", netns=host_netns)
            addresses.setdefault(host, {})[interface] = address
        for host, by_interface in addresses.items():
            built.hosts[host] = Host(netns=f"cairn-{host}-{suffix}", addresses=by_interface)
        yield built
    finally:
        for netns in reversed(made):  # deleting a namespace deletes its links too
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=10,
                           check=False)


def in_netns(netns: str, *command: str | Path) -> list[str]:
    """COMMAND run inside NETNS (`ip netns exec` execs it: a Popen's pid is the command's)."""
    return ["ip", "netns", "exec", netns, *map(str, command)]


def spawn_in(netns: str, *args: str) -> subprocess.Popen[str]:
    """This file as a script inside NETNS (`ip netns exec` execs it: the pid is Python's)."""
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(HELPER), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_json_line(process: subprocess.Popen[str], timeout: float) -> Any:
    """The next JSON line PROCESS prints, waiting at most TIMEOUT seconds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        said = ""
        if process.poll() is not None and process.stderr is not None:
            said = f"; it exited saying:\n{process.stderr.read()}"
        raise AssertionError(f"no line from {process.args!r} within {timeout} s{said}")
    return json.loads(line)


def reap(process: subprocess.Popen[str], timeout: float = 5) -> tuple[str, str]:
    """Stop PROCESS (closing its stdin asks it to), kill it if it lingers, and return its
    remaining stdout and stderr."""
    try:
        return process.communicate(input="", timeout=timeout)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        process.kill()
        return process.communicate(timeout=timeout)


# --- the script side: run inside a namespace --------------------------------------------------

def _emit(record: object) -> None:
    print(json.dumps(record), flush=True)


def _advertise(listen_host: str, port: int, appliance_id: str, fingerprint: str) -> None:
    """Advertise, print {"advertising": bool}, and keep advertising until stdin closes."""
    import trio

    from appliance.advertise import advertising

    async def main() -> None:
        async with advertising(listen_host, port, appliance_id, fingerprint) as advertised:
            _emit({"advertising": advertised})
            await trio.to_thread.run_sync(sys.stdin.read)

    trio.run(main)


def _browse(seconds: float, interfaces: Sequence[str], limit: int | None) -> None:
    """Browse and print {"found": [...]}."""
    import dataclasses

    import trio

    from agent.discovery import browse

    found = trio.run(lambda: browse(seconds, list(interfaces), limit=limit))
    _emit({"found": [dataclasses.asdict(a) for a in found]})


def _join_group(address: str) -> None:
    """Join the mDNS group on the interface holding ADDRESS, as another mDNS stack of the same
    machine would (avahi-daemon on a NAS), print {"joined": true}, and wait for stdin to close."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", 5353))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("224.0.0.251") + socket.inet_aton(address))
    _emit({"joined": True})
    sys.stdin.read()
    sock.close()


def main(argv: Sequence[str]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(name)s %(levelname)s %(message)s")
    command, *rest = argv
    if command == "advertise":
        host, port, appliance_id, fingerprint = rest
        _advertise(host, int(port), appliance_id, fingerprint)
    elif command == "browse":
        seconds, limit, *interfaces = rest
        _browse(float(seconds), interfaces, int(limit) if limit != "-" else None)
    elif command == "join-group":
        [address] = rest
        _join_group(address)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
