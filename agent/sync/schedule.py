"""When the sync engine runs a round: a small state machine over an injected clock.

Theory of operation. The engine's loop sleeps until it is woken — by an event (the local
watcher saw a change, the event stream announced a new cursor) or by the first of its
timers — then runs a round. Timers are kept by reason, each with its own deadline, so one
firing early never consumes another (a file still settling, a retry after a failure,
downloads held back by a full disk, a paused sync looked at again, the periodic rescan):

    reason    set by                                    fires
    settle    a scan that saw a file still being written   when it is stable
    retry     a failed round (backoff RETRY_S .. RETRY_MAX_S;  after the backoff
              x5 when the appliance refused something)
    disk      a full disk (downloads held back)          after the disk retry
    recheck   a pause that looks again by itself          after its delay
    busy      a round that ran out of passes              shortly
    rescan    the start, and every rescan                 every RESCAN_S: walk and plan
                                                          everything

`Schedule` is pure (times are numbers the caller passes); `agent.sync.wakeups` puts it on
trio's clock, so tests drive it with `trio.testing.MockClock` instead of sleeping. The remote
side's pace (hold the event stream; poll with backoff when it is down or the folder is
quiet) is `poll_interval`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

RESCAN_S = 300.0
RETRY_S = 1.0
RETRY_MAX_S = 30.0
REFUSED_FACTOR = 5
POLL_S = 2.0
POLL_MAX_S = 60.0
STREAM_WORKED_S = 5.0   # a stream up this long worked, whatever made it end


@dataclass
class Schedule:
    timers: dict[str, float] = field(default_factory=dict)    # reason -> deadline
    retry_s: float = RETRY_S
    downloads_paused_until: float = -math.inf

    def after(self, reason: str, now: float, seconds: float) -> None:
        """Fire REASON SECONDS after NOW (or earlier, if it is already set earlier)."""
        self.timers[reason] = min(self.timers.get(reason, math.inf), now + seconds)

    def due(self) -> float:
        return min(self.timers.values(), default=math.inf)

    def fire(self, now: float) -> set[str]:
        """The reasons due at NOW, taken off; the others stay."""
        fired = {reason for reason, at in self.timers.items() if at <= now}
        for reason in fired:
            del self.timers[reason]
        return fired

    def round_done(self) -> None:
        self.retry_s = RETRY_S

    def round_failed(self, now: float, refused: bool = False) -> float:
        """A round failed (the appliance unreachable, or REFUSED something): retry after
        the backoff, which doubles up to RETRY_MAX_S. The delay chosen."""
        delay = self.retry_s * (REFUSED_FACTOR if refused else 1)
        self.after("retry", now, delay)
        self.retry_s = min(self.retry_s * 2, RETRY_MAX_S)
        return delay

    def hold_downloads(self, now: float, seconds: float) -> None:
        self.downloads_paused_until = now + seconds
        self.after("disk", now, seconds)

    def downloads_held(self, now: float) -> bool:
        return now < self.downloads_paused_until


def stream_failures(failures: int, quiet: bool, held_s: float) -> int:
    """Stream failures in a row after the event stream ended: none when it was closed for
    being quiet or had been up STREAM_WORKED_S (it worked: an appliance restarted now and
    then must not push a device's polls out to a minute), else one more."""
    return 0 if quiet or held_s >= STREAM_WORKED_S else failures + 1


def poll_interval(failures: int, previous: float | None = None) -> float:
    """How long to wait before polling the feed: POLL_S, doubling (up to POLL_MAX_S) with
    each stream failure in a row, or with each quiet poll after PREVIOUS."""
    if previous is not None:
        return min(previous * 2, POLL_MAX_S)
    return min(POLL_S * 2 ** (failures - 1), POLL_MAX_S) if failures else POLL_S
