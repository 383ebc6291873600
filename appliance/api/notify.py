"""In-process fan-out of new change cursors to the `/events` streams.

After a write transaction commits, the route hands the journal's `published` map (user id
-> newest cursor) to `publish`; every stream waiting for one of those users wakes up. One
trio.Event per generation keeps waiting cheap however many streams are open.
"""

from __future__ import annotations

import math

import trio


class ChangeNotifier:
    def __init__(self) -> None:
        self._latest: dict[int, int] = {}
        self._changed = trio.Event()
        self.closed = False

    def publish(self, published: dict[int, int]) -> None:
        if not published:
            return
        for user, cursor in published.items():
            if cursor > self._latest.get(user, 0):
                self._latest[user] = cursor
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

    def close(self) -> None:
        """Shutting down: end every stream so the server can stop gracefully."""
        self.closed = True
        self._changed.set()
