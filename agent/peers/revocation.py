"""Which devices of the appliance are revoked: the peer service refuses them.

A revoked device keeps a certificate that still verifies (certificates live 24 h and are
not recalled), so after the TLS handshake the peer service asks `is_revoked(device_id)`
of the certificate's CN. The list comes from GET /devices/revoked (API 1.5), re-read
every REVOCATION_REFRESH_S and at once when the appliance's event stream says `event:
revoked` (`poke`): the target is that a revocation reaches every peer within 5 minutes,
and normally it takes a second.

Why a stale or not-yet-loaded list is not a hole: every peer request must carry a block
grant, which the appliance issues only to a device it accepts, and which expires after
GRANT_LIFETIME_S (15 minutes). So a revoked device is cut off by grant expiry at the
latest, whatever this list says; the list only closes that window sooner. When the
appliance cannot be reached the last list stays in force (it never shrinks by failure).

Thread-safety: the peer server calls `is_revoked` from worker threads. The list is a
frozenset replaced whole, so a reader sees the old one or the new one; the lock only
orders the writers.

Who holds the event stream: the sync engine's Follower (agent/sync/follow.py) holds one
while its folder is active and drops it to poll when quiet; `cairn mount` holds none. The
peer service must hear revocations whatever those do, so it runs its own follower
(`follow_revocations`): one more long-lived GET /events per device, idle but for a
heartbeat every EVENTS_HEARTBEAT_S. Sharing the engine's stream would tie revocation to
whether a folder happens to be syncing; a poll every minute (`refresh_forever`) catches
what a broken stream misses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import trio

from agent.api import Api
from agent.errors import CairnAgentError
from protocol import version
from protocol.limits import MAX_SQL_INT
from protocol.peers import REVOCATION_REFRESH_S

log = logging.getLogger("cairn.peers")

EVENTS_HEARTBEAT_S = 30.0
STREAM_RETRY_S = (1.0, 60.0)      # the follower's backoff after a broken stream: from, to
MIN_POKE_GAP_S = 1.0              # a burst of `revoked` events costs one request a second
# The cursor the revocation follower gives GET /events: beyond any real one, so the
# appliance announces no change cursors on it, only `revoked` and heartbeats.
NO_CURSOR_EVENTS = MAX_SQL_INT


class RevocationList:
    """The revoked device ids as last read from the appliance."""

    def __init__(self, revoked: Iterable[str] = ()) -> None:
        self._revoked: frozenset[str] = frozenset(revoked)
        self._lock = threading.Lock()
        self.as_of: float | None = None        # the appliance's time of the last read
        self._poked = trio.Event()

    def is_revoked(self, device_id: str) -> bool:
        """Whether DEVICE_ID was revoked (as of the last read). Any thread."""
        return device_id in self._revoked

    @property
    def revoked(self) -> frozenset[str]:
        return self._revoked

    def replace(self, revoked: Iterable[str], as_of: float | None) -> None:
        """Take a new list (any thread). An answer older than the one held is ignored:
        two reads racing must not bring back a list from before a revocation."""
        fresh = frozenset(revoked)
        with self._lock:
            if as_of is not None and self.as_of is not None and as_of < self.as_of:
                return
            added = fresh - self._revoked
            self._revoked, self.as_of = fresh, as_of
        if added:
            log.info("revoked devices now refused by peers: %s", ", ".join(sorted(added)))

    def poke(self) -> None:
        """Read the list again at once (from the trio thread: the event stream's
        callback). Several pokes before the read make one read."""
        self._poked.set()

    def on_event(self, name: str, data: Any) -> None:
        """A callback for Connection.follow_events: `event: revoked` pokes the list."""
        if name == "revoked":
            self.poke()

    async def refresh(self, api: Api) -> None:
        answer = await api.revoked_devices()
        self.replace(answer.revoked, answer.as_of)

    async def refresh_forever(self, api: Api, *, interval_s: float = REVOCATION_REFRESH_S
                              ) -> None:
        """Read the list now, then every INTERVAL_S and whenever poked, forever. Returns
        at once if the appliance is older than API 1.5 (it has no list; peers are off
        there anyway). A failed read is logged and the old list kept."""
        if api.connection.api_version is None:
            try:
                await api.health()
            except CairnAgentError as exc:
                log.debug("cannot ask the appliance's version yet: %s", exc.message)
        failing = False
        while True:
            if api.connection.api_version is not None and not api.supports(version.PEERS):
                log.debug("the appliance has no revocation list (API %s)",
                          api.connection.api_version)
                return
            self._poked = trio.Event()
            try:
                await self.refresh(api)
                if failing:
                    log.info("revocation list read again")
                failing = False
            except CairnAgentError as exc:
                if not failing:
                    log.warning("cannot read the revocation list (keeping the last one): "
                                "%s", exc.message)
                failing = True
            await trio.sleep(MIN_POKE_GAP_S)
            with trio.move_on_after(max(0.0, interval_s - MIN_POKE_GAP_S)):
                await self._poked.wait()

    async def follow_revocations(self, api: Api) -> None:
        """Hold the appliance's event stream for its `revoked` events, forever; when it
        breaks, wait (growing from STREAM_RETRY_S[0] to [1]) and hold it again. Each new
        stream also pokes once: a revocation may have come while it was down."""
        delay = STREAM_RETRY_S[0]
        while True:
            started = trio.current_time()
            try:
                await api.connection.follow_events(NO_CURSOR_EVENTS, EVENTS_HEARTBEAT_S,
                                                   lambda _cursor: None, self.on_event)
            except CairnAgentError as exc:
                log.debug("revocation events: stream down (%s)", exc.message)
            if trio.current_time() - started > 5 * EVENTS_HEARTBEAT_S:
                delay = STREAM_RETRY_S[0]
            await trio.sleep(delay)
            delay = min(delay * 2, STREAM_RETRY_S[1])
            self.poke()
