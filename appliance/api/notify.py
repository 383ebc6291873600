"""In-process fan-out of new change cursors, and of the number of revoked devices, to the
`/events` streams.

After a write transaction commits, the route hands the journal's `published` map (user id
-> newest cursor) to `publish`; every stream waiting for one of those users wakes up. One
trio.Event per generation keeps waiting cheap however many streams are open.

Devices are revoked by `cairnd device revoke`, another process writing the database, so
no route sees it happen: one task per server (`watch_revocations`) reads the count of
revoked devices every REVOCATION_POLL_S and `publish_revoked` wakes every stream when it
changed; each sends `event: revoked` and the peers re-read GET /devices/revoked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

REVOCATION_POLL_S = 1.0


class ChangeNotifier:
    def __init__(self) -> None:
        self._latest: dict[int, int] = {}
        self._changed = trio.Event()
        self.revoked_count = 0
        self.closed = False

    def publish(self, published: dict[int, int]) -> None:
        if not published:
            return
        for user, cursor in published.items():
            if cursor > self._latest.get(user, 0):
                self._latest[user] = cursor
        self._changed.set()
        self._changed = trio.Event()

    def publish_revoked(self, count: int) -> None:
        """The number of revoked devices is COUNT now; wake the streams if it changed."""
        if count == self.revoked_count:
            return
        self.revoked_count = count
        self._changed.set()
        self._changed = trio.Event()

    def latest(self, user_id: int) -> int:
        return self._latest.get(user_id, 0)

    async def wait_beyond(self, user_id: int, cursor: int, timeout_s: float) -> int | None:
        """The user's newest cursor once it passes `cursor`; None on timeout or close."""
        with trio.move_on_after(timeout_s if timeout_s > 0 else math.inf):
            while not self.closed:
                if self.latest(user_id) > cursor:
                    return self.latest(user_id)
                await self._changed.wait()
        return None

    async def wait_news(self, user_id: int, cursor: int, revoked_count: int,
                        timeout_s: float) -> bool:
        """Wait until the user's newest cursor passes CURSOR or the number of revoked
        devices is no longer REVOKED_COUNT; False on timeout or close."""
        with trio.move_on_after(timeout_s if timeout_s > 0 else math.inf):
            while not self.closed:
                if self.latest(user_id) > cursor or self.revoked_count != revoked_count:
                    return True
                await self._changed.wait()
        return False

    def close(self) -> None:
        """Shutting down: end every stream so the server can stop gracefully."""
        self.closed = True
        self._changed.set()


async def watch_revocations(notifier: ChangeNotifier, count: Callable[[], Awaitable[int]],
                            every_s: float = REVOCATION_POLL_S, *,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                            ) -> None:
    """Read the number of revoked devices (COUNT) every EVERY_S and publish it. The first
    read happens before `task_status.started`, so streams opened later never take the
    starting count for a change."""
    notifier.revoked_count = await count()
    task_status.started()
    while not notifier.closed:
        await trio.sleep(every_s)
        try:
            notifier.publish_revoked(await count())
        except Exception:   # a busy or failing database: try again at the next tick
            log.exception("reading the revoked devices failed; trying again")
