"""Which source fetches which block: the appliance and LAN peers at once (pure, no I/O).

A download knows the blocks it needs and, from each peer's HAVE answer, which peers hold
which of them. `FetchPlan` hands a block to a worker as soon as one is free, and is told
how each fetch ended. Theory of operation:

- **Sources.** The appliance holds every block and is always a source: the fallback for
  every block, and never dropped (its failures are the download's own, raised by the
  caller as without peers). A peer is asked only for blocks it said it holds.
- **Speed.** Each source's rate is measured as blocks completed per second of *busy time*
  (time with at least one request in flight), with a prior of one block in PRIOR_S for a
  source not yet measured. Busy time rather than per-request latency: a link shared by k
  requests serves each in k times as long, and the rate is what matters. A source whose
  requests stall sees its rate fall while they hang, so new work moves elsewhere before
  the read timeout fires.
- **Assignment: the earliest expected finish.** A block given to source s now would be
  done in about (in flight on s + 1) / rate(s). For each group of pending blocks held by
  the same peers (rarest groups first: blocks only the appliance has never wait on a
  peer), the source with the earliest expected finish among those that can serve it wins
  — peers before the appliance on a tie, to spare the shared box. If that source is at
  its cap of requests in flight, the group waits for it rather than going to a slower
  source: a fast peer gets most of the work, and the appliance serves only what it can
  finish sooner (with a fast peer on the LAN, a small fraction).
- **Failures.** Wrong bytes (the ciphertext's BLAKE3 is not its id, or it does not
  decrypt) or a refusal: the peer is dropped for the rest of the transfer. A timeout or a
  broken connection: the peer is benched for BENCH_S; a second strike drops it. "Not
  held" (404): that block leaves the peer's holdings. In every case the block goes back
  to the front of the queue, and the appliance or another holder takes it.
- **At most one source per block**, except the straggler re-issue: once nothing is left
  to hand out, a block in flight far longer than its source's expected time per block
  may be given once more to another source with room; the first answer is used, the
  other ignored (`succeeded` says which). Nothing waits on a peer that went silent: its
  blocks come back at the read timeout at the latest, and by then others have moved on.

Times are plain floats from the caller's clock (tests drive a fake one).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

APPLIANCE = "appliance"      # the appliance's source name; peers are named by the caller


class Failure(enum.Enum):
    """How a fetch from a peer ended badly (the appliance's failures are not reported:
    the download raises them)."""

    WRONG_BYTES = "wrong_bytes"   # not the block it named: dropped for the transfer
    REFUSED = "refused"           # 403: our grant or certificate refused: dropped
    NOT_HELD = "not_held"         # 404: the block left the peer since HAVE
    TIMEOUT = "timeout"           # connect or read timeout: benched, then dropped
    ERROR = "error"               # reset, protocol error: benched, then dropped


class Verdict(enum.Enum):
    """What a failure did to the peer."""

    KEPT = "kept"
    BENCHED = "benched"
    DROPPED = "dropped"


@dataclass(frozen=True)
class Limits:
    appliance_in_flight: int = 6    # DOWNLOAD_PARALLEL: what the appliance serves well
    peer_in_flight: int = 4         # a peer is one device, often a laptop
    prior_s: float = 0.25           # a source not yet measured: a block per this long
    bench_s: float = 10.0           # a peer that timed out rests this long
    strikes: int = 2                # timeouts/errors (not during a bench) to be dropped
    straggler_min_s: float = 1.0    # a block in flight this long (and
    straggler_factor: float = 4.0   # this many times its source's time per block) may
                                    # be re-issued once nothing else is left


@dataclass(frozen=True)
class Assignment:
    block_id: str
    source: str
    started_at: float
    duplicate: bool = False         # a straggler's re-issue


@dataclass
class _Source:
    name: str
    cap: int
    in_flight: int = 0
    completed: int = 0
    busy_s: float = 0.0
    busy_mark: float = 0.0
    strikes: int = 0
    benched_until: float | None = None
    benched_at: float = float("-inf")
    dropped: bool = False

    def tick(self, now: float) -> None:
        """Account busy time up to NOW (call before in_flight changes)."""
        if self.in_flight:
            self.busy_s += max(0.0, now - self.busy_mark)
        self.busy_mark = now

    def seconds_per_block(self, now: float, prior_s: float) -> float:
        busy = self.busy_s + (max(0.0, now - self.busy_mark) if self.in_flight else 0.0)
        return (busy + prior_s) / (self.completed + 1)

    def expected_finish(self, now: float, prior_s: float) -> float:
        return (self.in_flight + 1) * self.seconds_per_block(now, prior_s)

    def usable(self, now: float) -> bool:
        if self.dropped:
            return False
        if self.benched_until is not None and now >= self.benched_until:
            self.benched_until = None
        return self.benched_until is None


@dataclass
class _Group:
    holders: frozenset[str]                 # the peers that said they hold these blocks
    pending: deque[str] = field(default_factory=deque)


class FetchPlan:
    """The blocks of one transfer and who fetches each (see the module's docstring)."""

    def __init__(self, block_ids: Sequence[str], holdings: Mapping[str, Iterable[str]],
                 limits: Limits = Limits(), now: float = 0.0) -> None:
        """BLOCK_IDS: distinct blocks to fetch, in the order wanted. HOLDINGS: each peer's
        name and the blocks it said it holds."""
        self.limits = limits
        self._sources: dict[str, _Source] = {
            APPLIANCE: _Source(APPLIANCE, limits.appliance_in_flight, busy_mark=now)}
        held: dict[str, set[str]] = {}
        for peer, blocks in holdings.items():
            if peer == APPLIANCE:
                raise ValueError(f"a peer cannot be named {APPLIANCE!r}")
            self._sources[peer] = _Source(peer, limits.peer_in_flight, busy_mark=now)
            for block in blocks:
                held.setdefault(block, set()).add(peer)
        self._holders: dict[str, frozenset[str]] = {}
        self._groups: dict[frozenset[str], _Group] = {}
        for block in dict.fromkeys(block_ids):
            key = frozenset(held.get(block, ()))
            self._holders[block] = key
            self._group(key).pending.append(block)
        self._left = set(self._holders)
        self._running: dict[str, list[Assignment]] = {}
        self._reissued: set[str] = set()
        self.served: dict[str, int] = {}    # blocks used, by source
        self.local = 0                      # blocks that turned out to be on disk already

    # --- what the caller reads -------------------------------------------------------

    @property
    def done(self) -> bool:
        return not self._left

    @property
    def in_flight(self) -> int:
        return sum(len(running) for running in self._running.values())

    @property
    def blocks_from_peers(self) -> int:
        return sum(count for source, count in self.served.items() if source != APPLIANCE)

    def peers(self) -> list[str]:
        return [name for name in self._sources if name != APPLIANCE]

    def dropped(self) -> list[str]:
        return [name for name, source in self._sources.items() if source.dropped]

    def seconds_per_block(self, source: str, now: float) -> float:
        return self._sources[source].seconds_per_block(now, self.limits.prior_s)

    def add_peer(self, name: str, blocks: Iterable[str], now: float) -> bool:
        """A peer whose HAVE answer came in while the transfer runs (it starts at once
        with the appliance rather than wait on a slow peer's answer). False if a peer
        of that name is known already (one device seen under two records)."""
        if name == APPLIANCE or name in self._sources:
            return False
        self._sources[name] = _Source(name, self.limits.peer_in_flight, busy_mark=now)
        held = {block for block in blocks if block in self._holders}
        for block in held:
            self._holders[block] = self._holders[block] | {name}
        for group in list(self._groups.values()):
            if not any(block in held for block in group.pending):
                continue
            kept: deque[str] = deque()
            for block in group.pending:
                if block in held:
                    self._group(self._holders[block]).pending.append(block)
                else:
                    kept.append(block)
            group.pending = kept
        return True

    # --- handing out work ------------------------------------------------------------

    def take(self, now: float) -> Assignment | None:
        """The next block for a free worker, or None: nothing worth starting now (all
        left is in flight, or the best sources are full; ask again after a change or a
        moment), or everything is done."""
        if self.done:
            return None
        usable = [s for s in self._sources.values() if s.usable(now)]
        live = {s.name for s in usable}
        groups = [g for g in self._groups.values() if g.pending]
        groups.sort(key=lambda g: len(g.holders & live))    # rarest first
        for group in groups:
            best = self._best(usable, group.holders, now)
            if best is not None and best.in_flight < best.cap:
                return self._start(group.pending.popleft(), best, now)
        if not groups:
            return self._straggler(usable, now)
        return None

    def _best(self, usable: list[_Source], holders: frozenset[str], now: float
              ) -> _Source | None:
        candidates = [s for s in usable if s.name == APPLIANCE or s.name in holders]
        if not candidates:
            return None
        prior = self.limits.prior_s
        return min(candidates, key=lambda s: (s.expected_finish(now, prior),
                                              s.name == APPLIANCE, s.name))

    def _start(self, block: str, source: _Source, now: float,
               duplicate: bool = False) -> Assignment:
        source.tick(now)
        source.in_flight += 1
        assignment = Assignment(block, source.name, now, duplicate)
        self._running.setdefault(block, []).append(assignment)
        return assignment

    def _straggler(self, usable: list[_Source], now: float) -> Assignment | None:
        """Re-issue, once, the block in flight the longest beyond what its source should
        need, to the best other source with room."""
        limits = self.limits
        for block, running in sorted(self._running.items(),
                                     key=lambda item: item[1][0].started_at):
            if block in self._reissued or len(running) != 1:
                continue
            first = running[0]
            slow = self._sources[first.source]
            expected = slow.seconds_per_block(now, limits.prior_s) * limits.straggler_factor
            if now - first.started_at < max(limits.straggler_min_s, expected):
                continue
            others = [s for s in usable if s.name != first.source and s.in_flight < s.cap]
            best = self._best(others, self._holders[block], now)
            if best is not None:
                self._reissued.add(block)
                return self._start(block, best, now, duplicate=True)
        return None

    # --- results ---------------------------------------------------------------------

    def succeeded(self, assignment: Assignment, now: float, *, fetched: bool = True
                  ) -> bool:
        """ASSIGNMENT's block arrived (and checked out). FETCHED False: it was found on
        disk, not fetched (not counted in the source's speed). True if this is the
        block's first arrival (use it); False if a re-issue got it first."""
        source = self._finish(assignment, now)
        if fetched:
            source.completed += 1
        if assignment.block_id not in self._left:
            return False
        self._left.discard(assignment.block_id)
        if fetched:
            self.served[source.name] = self.served.get(source.name, 0) + 1
        else:
            self.local += 1
        return True

    def failed(self, assignment: Assignment, now: float, failure: Failure) -> Verdict:
        """A peer's fetch of ASSIGNMENT's block failed: the block goes back to the queue
        (unless another source has it in flight or done), and the peer is judged."""
        if assignment.source == APPLIANCE:
            raise ValueError("the appliance's failures are the download's to raise")
        source = self._finish(assignment, now)
        block = assignment.block_id
        verdict = self._judge(source, assignment, failure, now)
        if failure is Failure.NOT_HELD:
            self._holders[block] = self._holders[block] - {source.name}
        if block in self._left and block not in self._running:
            self._group(self._holders[block]).pending.appendleft(block)
        return verdict

    def _judge(self, source: _Source, assignment: Assignment, failure: Failure,
               now: float) -> Verdict:
        if source.dropped:
            return Verdict.DROPPED
        if failure in (Failure.WRONG_BYTES, Failure.REFUSED):
            source.dropped = True
            return Verdict.DROPPED
        if failure is Failure.NOT_HELD:
            return Verdict.KEPT
        if assignment.started_at < source.benched_at:
            return Verdict.BENCHED    # started before the bench: the same trouble
        source.strikes += 1
        if source.strikes >= self.limits.strikes:
            source.dropped = True
            return Verdict.DROPPED
        source.benched_until = now + self.limits.bench_s
        source.benched_at = now
        return Verdict.BENCHED

    def _finish(self, assignment: Assignment, now: float) -> _Source:
        running = self._running.get(assignment.block_id, [])
        if assignment not in running:
            raise ValueError(f"block {assignment.block_id[:12]} is not in flight on "
                             f"{assignment.source}")
        running.remove(assignment)
        if not running:
            del self._running[assignment.block_id]
        source = self._sources[assignment.source]
        source.tick(now)
        source.in_flight -= 1
        return source

    def _group(self, holders: frozenset[str]) -> _Group:
        group = self._groups.get(holders)
        if group is None:
            group = self._groups[holders] = _Group(holders)
        return group
