"""The user's peers on the LAN as they come and go: a continuous mDNS browse for
`_cairn-peer._tcp.local.` on the peer service's interfaces (agent/peers/advertise.py
chooses them and opens the zeroconf instance both share).

A record found is only a hint (an address and a port): anyone on the LAN can advertise.
Trust comes afterwards, from mutual TLS and the peer's certificate (agent/peers/
peer_client.py). The directory is read by the fetch policy, from any thread.

zeroconf calls the handler (agent/mdns.py's `state_handler`) in its browser thread,
which must not block; records are resolved (`get_service_info`, up to RESOLVE_TIMEOUT_MS)
in a thread of our own, fed by a queue. A record that goes away (a goodbye, or its TTL
run out) leaves the directory; so does one that changes and no longer parses.
"""

from __future__ import annotations

import logging
import queue
import threading

from zeroconf import ServiceBrowser, Zeroconf

from agent import mdns
from protocol.peers import PEER_SERVICE_TYPE, DiscoveredPeer, parse_peer_record

log = logging.getLogger("cairn.peers")

RESOLVE_TIMEOUT_MS = 3000


class PeerDirectory:
    """The peers found, by instance id, this service's own record left out (thread-safe)."""

    def __init__(self, own_instance: str | None = None) -> None:
        self.own_instance = own_instance
        self._peers: dict[str, DiscoveredPeer] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.version = 0

    def peers(self) -> list[DiscoveredPeer]:
        with self._lock:
            return list(self._peers.values())

    def put(self, peer: DiscoveredPeer) -> None:
        if peer.instance_id == self.own_instance:
            return
        with self._lock:
            if self._peers.get(peer.instance_id) != peer:
                self._peers[peer.instance_id] = peer
                self.version += 1
                self._changed.notify_all()

    def remove(self, instance_id: str) -> None:
        with self._lock:
            if self._peers.pop(instance_id, None) is not None:
                self.version += 1
                self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[DiscoveredPeer]:
        """The peers once at least COUNT are known, or after TIMEOUT seconds (tests)."""
        with self._lock:
            self._changed.wait_for(lambda: len(self._peers) >= count, timeout)
            return list(self._peers.values())


def _instance_of(name: str) -> str | None:
    suffix = "." + PEER_SERVICE_TYPE
    return name[:-len(suffix)] if name.endswith(suffix) else None


class PeerBrowser:
    """Keeps DIRECTORY up to date from INSTANCE's mDNS until `stop`."""

    def __init__(self, instance: Zeroconf, directory: PeerDirectory) -> None:
        self.instance = instance
        self.directory = directory
        self._names: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._browser: ServiceBrowser | None = None
        self._resolver = threading.Thread(target=self._resolve_loop, name="peer-resolve",
                                          daemon=True)

    def start(self) -> None:
        self._resolver.start()
        self._browser = ServiceBrowser(
            self.instance, PEER_SERVICE_TYPE,
            handlers=[mdns.state_handler(self._on_added, self._on_removed)])

    def stop(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
        self._names.put(None)
        self._resolver.join(RESOLVE_TIMEOUT_MS / 1000 + 1)

    def _other_peer(self, name: str) -> str | None:
        """The instance id of record NAME, unless it is no peer's or our own."""
        instance = _instance_of(name)
        return None if instance == self.directory.own_instance else instance

    def _on_added(self, name: str) -> None:
        if self._other_peer(name) is not None:
            self._names.put(name)

    def _on_removed(self, name: str) -> None:
        if (instance := self._other_peer(name)) is not None:
            self.directory.remove(instance)

    def _resolve_loop(self) -> None:
        while True:
            name = self._names.get()
            if name is None:
                return
            try:
                info = self.instance.get_service_info(PEER_SERVICE_TYPE, name,
                                                      timeout=RESOLVE_TIMEOUT_MS)
            except Exception as exc:   # zeroconf closing under us, mostly
                log.debug("cannot resolve the peer record %s: %s", name, exc)
                continue
            instance = _instance_of(name)
            if info is None or instance is None:
                continue
            peer = parse_peer_record(name, info.decoded_properties,
                                     info.parsed_scoped_addresses(), info.port)
            if peer is None:
                self.directory.remove(instance)
                log.debug("a peer record that is not usable: %s", name)
            else:
                self.directory.put(peer)
                log.debug("peer %s at %s:%s", peer.instance_id, peer.addresses, peer.port)
