"""Fetching one transfer's blocks from the appliance and LAN peers at once: the thin trio
shell around the pure FetchPlan (agent/peers/fetch.py), and what a download needs to use
peers at all (`PeerAccess`).

`run_plan` keeps WORKERS tasks busy: each asks the plan for a block, runs the blocking
fetch-verify-decrypt-write in a worker thread (like agent/pipeline.run_jobs, whose rules it
keeps: a block's bytes never cross the event loop, the first real failure stops the rest),
and tells the plan how it ended. A peer's failure is the plan's business — the block goes
elsewhere — and is logged here (WARNING for wrong bytes, with the peer's device id); the
appliance's failures, and local ones (a full disk), stop the transfer as they always did.

Who may be asked: `PeerAccess` holds this device's identity (renewed certificates are
picked up), a `PeerFinder` (the running peer service's continuous browse, or for a lone
`cairn get` a short browse of at most SHORT_BROWSE_S started while the file's URLs are
asked for), the revocation check, and one PeerClient per discovered peer, kept across the
downloads of one process so connections are reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from agent.api import Api
from agent.discovery import discovery_enabled
from agent.errors import CairnAgentError, IntegrityError, PeerError, PeerFetchError
from agent.home import AgentHome
from agent.peers import advertise
from agent.peers.browse import PeerBrowser, PeerDirectory
from agent.peers.config import PeersConfig, load_peers_config
from agent.peers.fetch import APPLIANCE, Assignment, Failure, FetchPlan, Limits, Verdict
from agent.peers.identity import PeerIdentity, load_identity
from agent.peers.peer_client import PeerClient, failure_of
from agent.peers.revocation import RevocationList
from agent.peers.service import PeerService, running
from agent.pipeline import first_error
from protocol.peers import DiscoveredPeer

log = logging.getLogger("cairn.peers")

IDLE_LOOK_S = 0.1        # a worker with nothing to start looks again this often
MIN_PEER_BLOCKS = 4      # a file of fewer blocks is not worth asking peers about
PER_PEER_WORKERS = 4     # workers added per peer found (a peer's in-flight cap)
MAX_WORKERS = 24
SHORT_BROWSE_S = 1.5     # `cairn get`'s own look for peers, at most
REVOCATIONS_S = 2.0      # `cairn get`'s one read of the revocation list, at most
BROWSE_QUIET_S = 0.4     # ... ended early once peers answered and no new one did for this


class Fetched(Protocol):
    """What a block's work returns: whether it came over the network (False: it was
    found on disk already)."""

    @property
    def fetched(self) -> bool: ...


F = TypeVar("F", bound=Fetched)


async def run_plan(plan: FetchPlan, work: Callable[[Assignment], F], *, workers: int,
                   done: Callable[[Assignment, F], None] | None = None) -> None:
    """Run WORK(assignment) in worker threads for every block of PLAN until all are in,
    WORKERS at a time; DONE(assignment, result) on the trio side for each block's first
    arrival. A peer's PeerFetchError or IntegrityError is reported to the plan; any other
    error (and any error of the appliance's) stops the rest and is raised as itself."""
    changed = trio.Event()

    def poke() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    async def worker() -> None:
        while not plan.done:
            job = plan.take(trio.current_time())
            if job is None:
                with trio.move_on_after(IDLE_LOOK_S):
                    await changed.wait()
                continue
            try:
                result = await trio.to_thread.run_sync(work, job)
            except (PeerFetchError, IntegrityError) as exc:
                if job.source == APPLIANCE:
                    raise
                _judged(plan, job, exc)
                poke()
                continue
            if plan.succeeded(job, trio.current_time(), fetched=result.fetched) \
                    and done is not None:
                done(job, result)
            poke()

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, workers)):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def _judged(plan: FetchPlan, job: Assignment, exc: CairnAgentError) -> None:
    failure = failure_of(exc)
    known_bad = job.source in plan.dropped()
    verdict = plan.failed(job, trio.current_time(), failure)
    if known_bad:     # a request in flight when the peer was dropped: said already
        log.debug("peer %s (dropped) failed block %s… too: %s", job.source,
                  job.block_id[:16], exc.message)
    elif failure is Failure.WRONG_BYTES:
        log.warning("peer %s sent wrong bytes for block %s… (%s): not asked again in "
                    "this transfer", job.source, job.block_id[:16],
                    exc.message if isinstance(exc, PeerFetchError)
                    else "not the block its id names")
    elif verdict is Verdict.DROPPED:
        log.info("peer %s dropped for this transfer (%s): %s", job.source, failure.value,
                 exc.message)
    else:
        log.info("peer %s %s (%s): %s", job.source, verdict.value, failure.value,
                 exc.message)


def workers_for(peers: int, base: int) -> int:
    return min(MAX_WORKERS, base + PER_PEER_WORKERS * peers)


def limits_for(appliance_in_flight: int) -> Limits:
    return Limits(appliance_in_flight=appliance_in_flight,
                  peer_in_flight=PER_PEER_WORKERS)


# --- who can be asked ------------------------------------------------------------------


class PeerFinder(Protocol):
    """Where the peers on the LAN come from."""

    def start(self) -> None:
        """Begin looking, if not looking all the time already (no waiting)."""

    async def found(self) -> list[DiscoveredPeer]:
        """The peers found (a short browse is waited out first)."""


class ListedPeers:
    """A finder over a function that lists the peers known now (the peer service's
    PeerDirectory.peers, which browses all the time). A browse that began less than
    SHORT_BROWSE_S ago and found nobody yet is waited out first: a sync's first
    downloads start together with its peer service."""

    def __init__(self, peers: Callable[[], list[DiscoveredPeer]],
                 browsing_since: float | None = None) -> None:
        self._peers = peers
        self._settled_at = (browsing_since or 0.0) + SHORT_BROWSE_S

    def start(self) -> None:
        pass

    async def found(self) -> list[DiscoveredPeer]:
        # Polled: the directory is filled by zeroconf's threads, not by trio.
        while not self._peers() and time.time() < self._settled_at:  # noqa: ASYNC110
            await trio.sleep(min(0.1, max(0.0, self._settled_at - time.time())))
        return self._peers()


class ShortBrowse:
    """A finder that browses once, for at most SECONDS from `start`, with BROWSE (a
    blocking function browsing for that long, run in a thread): for `cairn get`, which
    runs no peer service of its own."""

    def __init__(self, browse: Callable[[float], list[DiscoveredPeer]],
                 seconds: float = SHORT_BROWSE_S) -> None:
        self._browse = browse
        self._seconds = seconds
        self._result: list[DiscoveredPeer] | None = None
        self._done = trio.Event()
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        trio.lowlevel.spawn_system_task(self._run)

    async def _run(self) -> None:
        try:
            self._result = await trio.to_thread.run_sync(self._browse, self._seconds,
                                                         abandon_on_cancel=True)
        except Exception as exc:       # a browse that fails means no peers, nothing else
            log.info("could not look for peers: %s", exc)
            self._result = []
        finally:
            self._done.set()

    async def found(self) -> list[DiscoveredPeer]:
        self.start()
        with trio.move_on_after(self._seconds + 2.0):
            await self._done.wait()
        return list(self._result or [])


class PeerAccess:
    """What a download needs to fetch from peers (see the module's docstring). Attach
    one to `RemoteTree.peers`; close it when the process is done with it."""

    def __init__(self, identity: Callable[[], PeerIdentity | None], finder: PeerFinder,
                 revoked: Callable[[str], bool] = lambda device_id: False, *,
                 prepare: Callable[[], Awaitable[None]] | None = None) -> None:
        """PREPARE runs once, before the first clients are made (a lone get reads the
        revocation list there)."""
        self._identity = identity
        self.finder = finder
        self.revoked = revoked
        self._prepare = prepare
        self._clients: dict[tuple[str, tuple[str, ...], int], PeerClient] = {}
        self._client_identity: PeerIdentity | None = None
        self.blocks_from_peers = 0       # over this access's life (a get of a folder)

    def identity(self) -> PeerIdentity | None:
        return self._identity()

    async def clients(self) -> list[PeerClient]:
        """A client for each peer found, made once per peer record (and again when our
        own certificate was renewed)."""
        identity = self._identity()
        if identity is None:
            return []
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            await prepare()
        if identity is not self._client_identity:
            self.close()
            self._client_identity = identity
        peers = await self.finder.found()
        wanted = {(p.instance_id, p.addresses, p.port): p for p in peers}
        for key in list(self._clients):
            if key not in wanted:
                self._clients.pop(key).close()
        for key, peer in wanted.items():
            if key not in self._clients:
                self._clients[key] = PeerClient(peer, identity, revoked=self.revoked,
                                                max_connections=PER_PEER_WORKERS)
        return list(self._clients.values())

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


# --- where a process gets its PeerAccess -----------------------------------------------

_from_service: tuple[PeerService, PeerAccess] | None = None


def service_access() -> PeerAccess | None:
    """Access through the peer service this process runs (`cairn sync`, `cairn mount`:
    its continuous browse, its current identity, its revocation list), or None. Made
    once per service (trio thread only)."""
    global _from_service
    service = running()
    if service is None:
        return None
    if _from_service is not None and _from_service[0] is service:
        return _from_service[1]
    if _from_service is not None:
        _from_service[1].close()
    access = PeerAccess(lambda: service.identity,
                        ListedPeers(service.directory.peers, service.started_at),
                        service.revocations.is_revoked)
    _from_service = (service, access)
    return access


def browse_once(config: PeersConfig) -> Callable[[float], list[DiscoveredPeer]]:
    """A blocking browse for peers on CONFIG's interfaces lasting at most the seconds it
    is given (for `cairn get`, which runs no peer service): the peers found by then, or
    as soon as some were found and none new for BROWSE_QUIET_S (mDNS responders answer
    within ~120 ms). The browser is stopped in the background, not waited for."""

    def browse(seconds: float) -> list[DiscoveredPeer]:
        addresses = advertise.choose_addresses(config, advertise.machine_adapters(),
                                               advertise.interface_up,
                                               lan=discovery_enabled())
        if not addresses:
            return []
        instance = advertise.open_zeroconf(addresses)
        directory = PeerDirectory()
        browser = PeerBrowser(instance, directory)

        def stop() -> None:
            browser.stop()
            advertise.close(instance, None)

        try:
            browser.start()
            end = time.monotonic() + seconds
            seen, quiet_since = directory.version, time.monotonic()
            while time.monotonic() < end:
                time.sleep(0.05)
                if directory.version != seen:
                    seen, quiet_since = directory.version, time.monotonic()
                elif directory.peers() and time.monotonic() - quiet_since >= BROWSE_QUIET_S:
                    break          # peers answered, and nobody new for a moment
            return directory.peers()
        finally:
            threading.Thread(target=stop, name="peer-browse-stop", daemon=True).start()

    return browse


def lone_access(home: AgentHome, api: Api) -> PeerAccess | None:
    """Access for a process without a peer service (`cairn get`): HOME's identity as it
    is on disk (no request; renewal is sync's and mount's), a short browse started when
    a download is big enough, and the revocation list read once from API before the
    first peer is asked (at most REVOCATIONS_S; unread, a revoked device is still
    refused once its certificate expires, within a day). None when peers are off by
    config or there is no identity yet."""
    try:
        config = load_peers_config(home)
    except PeerError as exc:
        log.info("peers off: %s", exc.message)
        return None
    if not config.enabled:
        return None
    identity = load_identity(home)
    if identity is None:
        return None
    revocations = RevocationList()

    async def read_revocations() -> None:
        with trio.move_on_after(REVOCATIONS_S):
            try:
                await revocations.refresh(api)
            except CairnAgentError as exc:
                log.info("the revocation list could not be read: %s", exc.message)

    return PeerAccess(lambda: identity, ShortBrowse(browse_once(config)),
                      revocations.is_revoked, prepare=read_revocations)
