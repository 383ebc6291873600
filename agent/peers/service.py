"""The peer service: everything a device runs to serve blocks to its user's other devices
on the LAN and to find them, while `cairn sync` or `cairn mount` runs.

    async with peer_service(home, api, config, source) as service:
        ...   # service is a PeerService, or None when peers are off or cannot start

1. The device certificate (agent/peers/identity.py): the one on disk if it has half its
   life left, else one the appliance signs now (bounded); then renewed forever
   (`keep_identity_fresh`), each new one served from the next connection on.
2. The revocation list (agent/peers/revocation.py): read before the first request is
   served (bounded), then every minute and at once on the appliance's `revoked` event.
3. The server (agent/peers/server.py) on the chosen addresses (agent/peers/advertise.py:
   the LAN interfaces that are up; loopback only if the config asks; never the wildcard),
   on the config's port (0, or taken: any free one).
4. The mDNS record (a random instance id per start) and the browser keeping `.directory`.
5. A status file, HOME/peers-status/PID.json, every STATUS_EVERY_S: the counters and where
   it serves (`cairn status`, tests). Removed at a clean stop.

Peers are a help, never a need: whatever fails here is one logged line and the service is
None (or runs without mDNS); syncing and mounting go on through the appliance. At the
end (a signal cancels the caller), the record is unregistered (goodbye packets), the
server closed and its connection threads given a few seconds; all shielded.

The running service is also reachable as `running()`, for the download paths of the same
process (agent/peers/fetch.py, the drive's block source): they need its directory, its
identity (the client certificate) and its revocation list.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from zeroconf import ServiceInfo

from agent.api import Api
from agent.discovery import discovery_enabled
from agent.errors import CairnAgentError, PeerError
from agent.home import AgentHome, write_private
from agent.peers import advertise
from agent.peers.advertise import PeerAddress, choose_addresses
from agent.peers.browse import PeerBrowser, PeerDirectory
from agent.peers.config import PeersConfig, load_peers_config
from agent.peers.identity import (
    PeerIdentity,
    keep_identity_fresh,
    load_identity,
    try_ensure_identity,
)
from agent.peers.revocation import RevocationList
from agent.peers.server import PeerCounters, PeerServer, Us
from agent.peers.sources import BlockSource
from protocol.peers import new_instance_id

log = logging.getLogger("cairn.peers")

STATUS_DIR = "peers-status"
STATUS_EVERY_S = 1.0
REVOCATIONS_AT_START_S = 5.0
STOP_TIMEOUT_S = 5.0


@dataclass
class PeerService:
    """A running peer service (see the module). `identity` changes when the certificate
    is renewed; read it when making a connection, not once."""

    identity: PeerIdentity
    directory: PeerDirectory
    revocations: RevocationList
    server: PeerServer
    instance_id: str
    addresses: list[PeerAddress]
    advertised: bool = False
    started_at: float = field(default_factory=time.time)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def counters(self) -> PeerCounters:
        return self.server.counters

    def renewed(self, identity: PeerIdentity) -> None:
        """Serve with a new certificate from the next connection on."""
        self.identity = identity
        self.server.context = identity.server_context()
        self.server.us = _us(identity)

    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "instance": self.instance_id, "port": self.port,
                "addresses": [a.address for a in self.addresses],
                "advertised": self.advertised, "peers": len(self.directory.peers()),
                "started_at": self.started_at, "written_at": time.time(),
                **self.counters.snapshot()}


_running: PeerService | None = None


def running() -> PeerService | None:
    """The peer service this process runs, if any (any thread)."""
    return _running


def _us(identity: PeerIdentity) -> Us:
    return Us(identity.me.appliance_id, identity.me.user_tag, identity.ca_public_key())


# --- the status file ----------------------------------------------------------------------

def status_path(home: AgentHome, pid: int | None = None) -> Path:
    return home.path / STATUS_DIR / f"{os.getpid() if pid is None else pid}.json"


def write_status(home: AgentHome, status: dict[str, Any]) -> None:
    path = status_path(home)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_private(path, json.dumps(status).encode())


def read_statuses(home: AgentHome) -> list[dict[str, Any]]:
    """The status of every peer service of HOME still running (files of processes gone
    are removed)."""
    found = []
    folder = home.path / STATUS_DIR
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            status = json.loads(path.read_text())
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(status)
    return found


# --- running it ---------------------------------------------------------------------------

async def _identity(home: AgentHome, api: Api) -> PeerIdentity | None:
    identity = await trio.to_thread.run_sync(load_identity, home)
    if identity is not None:
        return identity         # renewed in the background if half its life is gone
    return await try_ensure_identity(api, home)


async def _addresses(config: PeersConfig) -> list[PeerAddress]:
    adapters = await trio.to_thread.run_sync(advertise.machine_adapters)
    return choose_addresses(config, adapters, advertise.interface_up,
                            lan=discovery_enabled())


async def _run_mdns(service: PeerService) -> None:
    """Advertise SERVICE and browse for peers until cancelled; then unregister (goodbye
    packets) and close, shielded. Registering probes the name for about 1.5 s: a task of
    its own, so that nothing waits for it."""
    info = advertise.peer_service_info(service.instance_id, service.port,
                                       [a.address for a in service.addresses])
    try:
        instance = await trio.to_thread.run_sync(advertise.open_zeroconf, service.addresses)
    except advertise.ZEROCONF_FAILURES as exc:
        log.warning("peers: no mDNS (%s: %s): serving, but other devices will not find "
                    "this one", type(exc).__name__, exc)
        return
    browser = PeerBrowser(instance, service.directory)
    registered: ServiceInfo | None = None
    try:
        browser.start()
        try:
            await trio.to_thread.run_sync(advertise.register, instance, info)
            registered = info
            service.advertised = True
            log.info("peers: advertised as %s", info.name)
        except advertise.ZEROCONF_FAILURES as exc:
            log.warning("peers: cannot advertise this device (%s: %s)", type(exc).__name__,
                        exc)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(browser.stop)
            await trio.to_thread.run_sync(advertise.close, instance, registered)
            service.advertised = False


async def _status_writer(home: AgentHome, service: PeerService) -> None:
    last: dict[str, Any] = {}
    while True:
        status = service.status()
        if {k: v for k, v in status.items() if k != "written_at"} != last:
            last = {k: v for k, v in status.items() if k != "written_at"}
            await trio.to_thread.run_sync(write_status, home, status)
        await trio.sleep(STATUS_EVERY_S)


@asynccontextmanager
async def peer_service(home: AgentHome, api: Api, config: PeersConfig,
                       source: BlockSource) -> AsyncIterator[PeerService | None]:
    """Run the peer service serving SOURCE for the duration of the block (see the
    module); None when it is off or cannot start (logged once)."""
    global _running
    if not config.enabled:
        yield None
        return
    # The certificate first, wherever this device may serve: `cairn sync` and `cairn
    # mount` are also where a device joined before peers existed gets one.
    identity = await _identity(home, api)
    if identity is None:
        yield None          # try_ensure_identity said why
        return
    addresses = await _addresses(config)
    if not addresses:
        # CAIRN_DISCOVERY=off (a machine without mDNS, every test on loopback) is a
        # choice, not news; a LAN with no interface up is.
        log.log(logging.DEBUG if not discovery_enabled() else logging.INFO,
                "peers: no interface to serve on (%s)",
                "LAN discovery is off" if not discovery_enabled() else
                "no non-loopback interface is up")
        yield None
        return
    revocations = RevocationList()
    with trio.move_on_after(REVOCATIONS_AT_START_S):
        try:
            await revocations.refresh(api)
        except CairnAgentError as exc:
            log.info("peers: revocation list not read yet (%s)", exc.message)
    instance_id = new_instance_id()
    server = PeerServer(identity.server_context(), _us(identity), source,
                        revocations.is_revoked)
    try:
        await trio.to_thread.run_sync(server.listen, [a.address for a in addresses],
                                      config.port)
    except OSError as exc:
        log.warning("peers off: %s", exc)
        yield None
        return
    served_on = [a for a in addresses if any(a.address == host for host, _ in
                                             server.addresses)]
    service = PeerService(identity, PeerDirectory(instance_id), revocations, server,
                          instance_id, served_on)
    server.start()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(revocations.refresh_forever, api)
            nursery.start_soon(revocations.follow_revocations, api)
            nursery.start_soon(keep_identity_fresh, api, home, service.renewed)
            nursery.start_soon(_status_writer, home, service)
            nursery.start_soon(_run_mdns, service)
            log.info("peers: serving on %s port %d",
                     ", ".join(a.address for a in served_on), service.port)
            _running = service
            try:
                yield service
            finally:
                _running = None
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.stop, STOP_TIMEOUT_S)
            status_path(home).unlink(missing_ok=True)
            log.info("peers: stopped (%d blocks served, %d refused)",
                     service.counters.served_blocks, sum(service.counters.refusals.values()))


@asynccontextmanager
async def peers_if_wanted(home: AgentHome, api: Api, source: BlockSource, *,
                          wanted: bool = True) -> AsyncIterator[PeerService | None]:
    """`peer_service` for `cairn sync` and `cairn mount`: off with `--no-peers` (WANTED
    False) or `[peers] enabled = false`; a config that cannot be read is one line and
    peers off — never a reason for the command to fail."""
    if not wanted:
        yield None
        return
    try:
        config = load_peers_config(home)
    except PeerError as exc:
        log.warning("peers off: %s", exc.message)
        yield None
        return
    async with peer_service(home, api, config, source) as service:
        yield service
