"""The agent's mDNS shell: python-zeroconf's blocking API, opened on chosen addresses only.

The agent deals in three DNS-SD records: the appliance's (`_cairn._tcp`, browsed by
agent/discovery.py), a join request's (`_cairn-join._tcp`, advertised and browsed by
agent/pairing/mdns.py) and a peer's (`_cairn-peer._tcp`, agent/peers/advertise.py and
agent/peers/browse.py). What each record holds and which addresses each uses (loopback or
not, IPv4 only or not) is decided there; how zeroconf is opened and closed (a record's
goodbye), and a browse run, is decided here, once:

- zeroconf listens and sends on the addresses it is given and nowhere else (`open_zeroconf`);
  with an interface name, its sockets are bound to that interface too (SO_BINDTODEVICE:
  appliance/advertise.py explains why joining the group on one interface is not enough on
  Linux).
- a record found is only a hint: PARSE turns a resolved record into a value, or None for
  one that is malformed or foreign (dropped, never raised); a record that says goodbye
  (or whose TTL runs out) is forgotten.
- every call here blocks (`close` sends goodbyes, a browse lasts its SECONDS; registering
  a record probes its name for about 1.5 s): callers run them in worker threads (`browse`
  does).
- zeroconf costs ~0.1 s to import: it is imported inside the functions, so that only the
  commands that use the LAN pay for it.
"""

from __future__ import annotations

import functools
import logging
import queue
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- opening and closing -----------------------------------------------------------------

def open_zeroconf(addresses: Sequence[str], interface: str | None = None) -> Zeroconf:
    """Zeroconf on ADDRESSES (addresses of this machine) only; with INTERFACE, its sockets
    bound to that interface as well."""
    from zeroconf import Zeroconf

    # A list, not a tuple: zeroconf only treats a list as "these interfaces".
    instance = Zeroconf(interfaces=list(addresses), use_asyncio=False)
    if interface is not None:
        try:
            _pin_to_interface(instance, interface)
        except BaseException:
            instance.close()
            raise
    return instance


def _pin_to_interface(instance: Zeroconf, interface: str) -> None:
    """Zeroconf's sockets hear and answer on INTERFACE only (Linux SO_BINDTODEVICE;
    before Linux 5.7 it needs CAP_NET_RAW: without it, one warning)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        for reader in instance.engine.readers:
            reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                   interface.encode())
    except OSError as exc:
        log.warning("cannot confine mDNS to %s (%s)", interface, exc.strerror)


def close(instance: Zeroconf, info: ServiceInfo | None = None) -> None:
    """Unregister INFO (its goodbye packets), then close INSTANCE (goodbyes for whatever
    else it still advertises; sockets closed). Never raises: it runs on the way out, and a
    record whose goodbye is lost expires with its TTL anyway."""
    if info is not None:
        try:
            instance.unregister_service(info)
        except Exception as exc:
            log.info("the goodbye of %s failed: %s", info.name, exc)
    try:
        instance.close()
    except Exception as exc:
        log.info("closing mDNS failed: %s", exc)


# --- browsing --------------------------------------------------------------------------

def state_handler(added: Callable[[str], None], removed: Callable[[str], None]
                  ) -> Callable[..., None]:
    """A ServiceBrowser handler calling ADDED(name) for a record that appeared or changed
    and REMOVED(name) for one that said goodbye or expired. It runs in zeroconf's thread,
    which must not block: resolve the names elsewhere."""
    from zeroconf import ServiceStateChange

    def on_change(*, zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange, **_: Any) -> None:
        if state_change is ServiceStateChange.Removed:
            removed(name)
        else:
            added(name)

    return on_change


def browse_once(service_type: str, parse: Callable[[ServiceInfo], T | None],
                seconds: float, interfaces: Sequence[str], *,
                limit: int | None = None) -> list[T]:
    """The records of SERVICE_TYPE answering on INTERFACES (addresses of this machine)
    within SECONDS, as PARSE makes them (records it refuses left out), or as soon as LIMIT
    of them are. Sends queries there and nowhere else. Blocks for SECONDS at most, plus
    about 0.2 s to close. Raises OSError (or RuntimeError) if zeroconf cannot open its
    sockets, ValueError if INTERFACES is empty."""
    from zeroconf import ServiceBrowser

    if not interfaces:
        raise ValueError("browse needs at least one interface address")
    deadline = time.monotonic() + seconds
    names: queue.SimpleQueue[str] = queue.SimpleQueue()
    found: dict[str, T] = {}

    def gone(name: str) -> None:
        found.pop(name, None)  # a goodbye: it stopped serving meanwhile

    instance = open_zeroconf(interfaces)
    try:
        browser = ServiceBrowser(instance, service_type,
                                 handlers=[state_handler(names.put, gone)])
        try:
            while limit is None or len(found) < limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    name = names.get(timeout=remaining)
                except queue.Empty:
                    break
                remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
                info = instance.get_service_info(service_type, name, timeout=remaining_ms)
                value = parse(info) if info is not None else None
                if value is not None:
                    found[name] = value
        finally:
            browser.cancel()
    finally:
        instance.close()
    return list(found.values())


async def browse(service_type: str, parse: Callable[[ServiceInfo], T | None],
                 seconds: float, interfaces: Sequence[str], *,
                 limit: int | None = None) -> list[T]:
    """`browse_once` in a worker thread. Not cancellable midway: the thread returns within
    SECONDS (plus about 0.2 s to close)."""
    return await trio.to_thread.run_sync(functools.partial(
        browse_once, service_type, parse, seconds, list(interfaces), limit=limit))
