"""The sync schedule (agent/sync/schedule.py): timers by reason, backoff, held downloads,
poll intervals — on plain numbers; and agent/sync/wakeups.py on trio's MockClock (no sleeping)."""

from __future__ import annotations

import math

import trio
import trio.testing

from agent.sync.schedule import (
    POLL_MAX_S,
    POLL_S,
    RETRY_MAX_S,
    RETRY_S,
    STREAM_WORKED_S,
    Schedule,
    poll_interval,
    stream_failures,
)
from agent.sync.wakeups import Wakeups


def test_each_reason_keeps_its_own_earliest_deadline() -> None:
    schedule = Schedule()
    assert schedule.due() == math.inf
    schedule.after("settle", 10.0, 0.3)
    schedule.after("settle", 10.0, 5.0)           # a later one does not push it back
    schedule.after("retry", 10.0, 1.0)
    assert schedule.due() == 10.3
    assert schedule.fire(10.2) == set()
    assert schedule.fire(10.3) == {"settle"}
    assert schedule.due() == 11.0                 # the other timer stays
    assert schedule.fire(20.0) == {"retry"} and schedule.due() == math.inf


def test_failed_rounds_back_off_and_a_good_one_resets() -> None:
    schedule = Schedule()
    delays = [schedule.round_failed(0.0) for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, RETRY_MAX_S, RETRY_MAX_S]
    schedule.round_done()
    assert schedule.round_failed(100.0, refused=True) == RETRY_S * 5
    assert schedule.timers["retry"] == 1.0        # the earliest retry set stays


def test_held_downloads_end_with_their_own_timer() -> None:
    schedule = Schedule()
    assert not schedule.downloads_held(0.0)
    schedule.hold_downloads(5.0, 30.0)
    assert schedule.downloads_held(34.9) and not schedule.downloads_held(35.0)
    assert schedule.fire(35.0) == {"disk"}


def test_poll_intervals() -> None:
    assert poll_interval(0) == POLL_S
    assert [poll_interval(n) for n in (1, 2, 3)] == [POLL_S, 2 * POLL_S, 4 * POLL_S]
    assert poll_interval(30) == POLL_MAX_S
    assert poll_interval(0, 8.0) == 16.0 and poll_interval(0, 50.0) == POLL_MAX_S


def test_a_timer_firing_first_does_not_consume_a_settling_file_s_timer() -> None:
    """bb19bd5 (seed 2502112): a round woken by another timer used to consume the one set
    for a file still being written, which then waited for the next change or the
    five-minute rescan. Timers by reason: the settle timer still fires on time."""
    woke: list[tuple[float, set[str]]] = []

    async def main() -> None:
        wakeups = Wakeups()
        start = trio.current_time()
        wakeups.wake_in("settle", 0.3)       # a scan saw a file settling
        wakeups.wake_in("retry", 0.1)        # and something else wants a round sooner
        for _ in range(2):
            fired = await wakeups.next()
            woke.append((round(trio.current_time() - start, 6), fired))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert woke == [(0.1, {"retry"}), (0.3, {"settle"})]


def test_an_event_wakes_at_once_and_fires_no_timer() -> None:
    woke: list[tuple[float, set[str]]] = []

    async def main() -> None:
        wakeups = Wakeups()
        start = trio.current_time()
        wakeups.wake_in("rescan", 300.0)

        async def watcher() -> None:
            await trio.sleep(2.0)
            wakeups.wake()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            for _ in range(2):
                fired = await wakeups.next()
                woke.append((round(trio.current_time() - start, 6), fired))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert woke == [(2.0, set()), (300.0, {"rescan"})]


def test_offline_rounds_are_retried_on_the_backoff() -> None:
    """The loop as the engine runs it: a round that cannot reach the appliance sets the
    retry timer; the next round runs when it fires."""
    rounds: list[float] = []

    async def main() -> None:
        wakeups = Wakeups()
        start = trio.current_time()
        wakeups.wake()
        for _ in range(5):
            await wakeups.next()
            rounds.append(round(trio.current_time() - start, 6))
            wakeups.schedule.round_failed(trio.current_time())

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert rounds == [0.0, 1.0, 3.0, 7.0, 15.0]


def test_a_stream_that_worked_resets_the_failures() -> None:
    """An appliance restarted now and then must not push a device's polls out to a
    minute (the crash campaign measured 4, 12, 28, 57 s after 3-6 restarts)."""
    assert stream_failures(0, quiet=False, held_s=0.1) == 1         # refused at once
    assert stream_failures(5, quiet=False, held_s=0.1) == 6
    assert stream_failures(5, quiet=False, held_s=STREAM_WORKED_S) == 0   # it worked
    assert stream_failures(5, quiet=True, held_s=0.1) == 0
