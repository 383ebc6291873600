"""The engine loop's side of the pure `Schedule`, on trio's clock (so tests drive it with
`trio.testing.MockClock`)."""

from __future__ import annotations

import trio

from agent.sync.schedule import Schedule


class Wakeups:
    """The loop's side of the schedule, on trio's clock: `wake` (an event: now),
    `wake_in` (a timer), and `next`, which waits for either."""

    def __init__(self, schedule: Schedule | None = None) -> None:
        self.schedule = schedule or Schedule()
        self._event = trio.Event()

    def wake(self) -> None:
        self._event.set()

    def wake_in(self, reason: str, seconds: float) -> None:
        self.schedule.after(reason, trio.current_time(), seconds)

    async def next(self) -> set[str]:
        """Wait until woken or the first timer is due; the timers that fired (none: an
        event woke it)."""
        with trio.move_on_at(self.schedule.due()):
            await self._event.wait()
        self._event = trio.Event()
        return self.schedule.fire(trio.current_time())
