"""Following the appliance: hold its event stream while the folder is active; poll the
changes feed with backoff (schedule.poll_interval) when the stream is down or after
QUIET_S without a change on either side. Either way it only wakes the engine, whose
round pulls the feed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import trio

from agent.errors import CairnAgentError
from agent.remote import RemoteTree
from agent.sync.mirror import Mirror
from agent.sync.schedule import poll_interval, stream_failures

log = logging.getLogger("cairn.sync")

QUIET_S = 600.0
HEARTBEAT_S = 15.0
PULL_S = 0.5          # a round's pull, before a poll looks at the cursor


class Follower:
    def __init__(self, tree: RemoteTree, mirror: Mirror, wake: Callable[[], None],
                 local_activity: Callable[[], int]) -> None:
        self.tree = tree
        self.mirror = mirror
        self.wake = wake
        self.local_activity = local_activity
        self.streaming = False       # the stream is up and has announced something
        self.announced = 0           # the newest cursor it announced

    def must_pull(self, cursor: int) -> bool:
        """Whether a round must pull the feed: unless the stream is up and announced
        nothing beyond CURSOR (then there is nothing to pull: a round woken by a local
        change or a timer needs no request to the appliance)."""
        return not self.streaming or self.announced > cursor

    async def run(self) -> None:
        failures = 0
        while True:
            started = trio.current_time()
            quiet = await self._hold_stream()
            failures = stream_failures(failures, quiet, trio.current_time() - started)
            await self._poll(until_active=quiet, first_s=poll_interval(failures))

    async def _hold_stream(self) -> bool:
        """True when the stream was closed for being quiet, False when it broke."""
        with trio.move_on_after(QUIET_S) as quiet:
            try:
                await self.tree.connection.follow_events(
                    self.mirror.cursor, HEARTBEAT_S, partial(self._on_cursor, quiet))
            except CairnAgentError as exc:
                log.debug("event stream down: %s", exc.message)
            finally:
                self.streaming = False
            self.mirror.check_next = True   # it may come back restarted from an older copy
            return False
        log.debug("quiet for %.0f s: polling instead of holding the stream", QUIET_S)
        return True

    def _on_cursor(self, quiet: trio.CancelScope, cursor: int) -> None:
        self.streaming = True
        self.announced = max(self.announced, cursor)
        if cursor > self.mirror.cursor:
            quiet.deadline = trio.current_time() + QUIET_S
            self.wake()

    async def _poll(self, until_active: bool, first_s: float) -> None:
        """Wake rounds (each pulls the feed) at growing intervals; once, or — when the
        folder went quiet — until something changes on either side."""
        interval = first_s
        while True:
            cursor, activity = self.mirror.cursor, self.local_activity()
            await trio.sleep(interval)
            self.wake()
            await trio.sleep(PULL_S)
            if not until_active or self.mirror.cursor != cursor \
                    or self.local_activity() != activity:
                return
            interval = poll_interval(0, interval)
