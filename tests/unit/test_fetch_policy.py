"""The fetch policy (agent/peers/fetch.py) driven by a discrete-event simulation on a fake
clock: sources with fixed speeds, failures scripted per source, a pool of workers."""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.peers.fetch import APPLIANCE, Assignment, Failure, FetchPlan, Limits, Verdict

Outcome = Failure | None          # None: the block arrived
TICK_S = 0.05                     # a waiting worker asks again this often


@dataclass
class Sim:
    """WORKERS free workers take from PLAN; a source's fetch takes SECONDS[source] (a
    bandwidth-shared link: k requests in flight each take k times as long is close
    enough for a policy test if SHARED) and ends as OUTCOME(assignment, n-th request)."""

    plan: FetchPlan
    seconds: dict[str, float]
    outcome: Callable[[Assignment, int], Outcome] = lambda a, n: None
    workers: int = 10
    shared: bool = True
    now: float = 0.0
    events: list[tuple[float, int, Assignment]] = field(default_factory=list)
    log: list[tuple[Assignment, Outcome, bool | Verdict]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    requests: Counter[str] = field(default_factory=Counter)

    def run(self, limit_s: float = 10_000.0) -> float:
        idle = self.workers
        while not self.plan.done:
            assert self.now < limit_s, "the transfer never finished"
            while idle:
                job = self.plan.take(self.now)
                if job is None:
                    break
                self.requests[job.source] += 1
                busy = self.plan._sources[job.source].in_flight if self.shared else 1
                end = self.now + self.seconds[job.source] * max(1, busy)
                heapq.heappush(self.events, (end, next(self.counter), job))
                idle -= 1
            if self.events and self.events[0][0] <= self.now + TICK_S:
                end, _, job = heapq.heappop(self.events)
                self.now = max(self.now, end)
                idle += 1
                result = self.outcome(job, self.requests[job.source])
                if result is None:
                    self.log.append((job, None, self.plan.succeeded(job, self.now)))
                else:
                    self.log.append((job, result, self.plan.failed(job, self.now, result)))
            else:
                self.now += TICK_S   # waiting workers look again every moment
        while self.events:           # what is still in flight ends, and is ignored
            _, _, job = heapq.heappop(self.events)
            self.log.append((job, None, self.plan.succeeded(job, self.now)))
        return self.now


def ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(n)]


def used(sim: Sim) -> Counter[str]:
    """Which source's copy of each block was used."""
    return Counter(job.source for job, result, first in sim.log
                   if result is None and first is True)


def test_a_faster_peer_gets_more_and_the_appliance_little() -> None:
    blocks = ids(256)
    plan = FetchPlan(blocks, {"fast": blocks, "slow": blocks})
    sim = Sim(plan, {APPLIANCE: 0.33, "fast": 0.03, "slow": 0.12}, workers=14)
    sim.run()
    counts = used(sim)
    assert sum(counts.values()) == 256
    assert counts["fast"] > 2 * counts["slow"] > 0
    assert counts[APPLIANCE] < 256 * 0.1
    assert plan.blocks_from_peers == counts["fast"] + counts["slow"]


def test_the_appliance_takes_what_no_peer_holds_and_its_share_when_faster() -> None:
    blocks = ids(100)
    plan = FetchPlan(blocks, {"peer": blocks[:50]})
    sim = Sim(plan, {APPLIANCE: 0.01, "peer": 0.2}, workers=10)
    sim.run()
    counts = used(sim)
    assert sum(counts.values()) == 100
    assert counts[APPLIANCE] > 80          # faster: most of the held ones too
    assert all(job.block_id in blocks[:50] for job, *_ in sim.log if job.source == "peer")


def test_every_block_exactly_once_and_never_two_sources_at_once() -> None:
    blocks = ids(300)
    plan = FetchPlan(blocks, {"a": blocks[::2], "b": blocks[::3], "c": blocks})
    sim = Sim(plan, {APPLIANCE: 0.1, "a": 0.05, "b": 0.07, "c": 0.2}, workers=18)
    original_take = plan.take

    def take(now: float) -> Assignment | None:
        job = original_take(now)
        if job is not None and not job.duplicate:
            running = [a for a in plan._running[job.block_id]]
            assert len(running) == 1, "two sources for one block"
        return job

    plan.take = take          # type: ignore[method-assign]
    sim.run()
    first = [job.block_id for job, result, ok in sim.log if result is None and ok is True]
    assert sorted(first) == sorted(blocks)
    assert plan.done and plan.in_flight == 0


def test_wrong_bytes_drop_the_peer_and_the_block_comes_from_elsewhere() -> None:
    blocks = ids(64)
    plan = FetchPlan(blocks, {"liar": blocks, "honest": blocks})

    def outcome(job: Assignment, n: int) -> Outcome:
        return Failure.WRONG_BYTES if job.source == "liar" else None

    sim = Sim(plan, {APPLIANCE: 0.3, "liar": 0.01, "honest": 0.05}, outcome, workers=12)
    sim.run()
    lies = [(job, verdict) for job, result, verdict in sim.log
            if result is Failure.WRONG_BYTES]
    assert lies and all(verdict is Verdict.DROPPED for _, verdict in lies)
    # No request is started on the liar after its first lie came back.
    first_lie = min(job.started_at for job, _ in lies)
    assert not [job for job, *_ in sim.log
                if job.source == "liar" and job.started_at > first_lie]
    assert plan.dropped() == ["liar"]
    assert sorted(j.block_id for j, r, ok in sim.log if r is None and ok is True) == blocks


def test_a_refusal_drops_and_not_held_only_forgets_that_block() -> None:
    blocks = ids(40)
    plan = FetchPlan(blocks, {"strict": blocks, "forgetful": blocks})

    def outcome(job: Assignment, n: int) -> Outcome:
        if job.source == "strict":
            return Failure.REFUSED
        if job.source == "forgetful" and job.block_id in blocks[:5]:
            return Failure.NOT_HELD
        return None

    sim = Sim(plan, {APPLIANCE: 0.5, "strict": 0.01, "forgetful": 0.02}, outcome)
    sim.run()
    assert plan.dropped() == ["strict"]
    tried = Counter(job.block_id for job, *_ in sim.log if job.source == "forgetful")
    assert all(tried[b] <= 1 for b in blocks[:5])        # not asked twice for it
    assert used(sim)["forgetful"] > 20                   # and still used for the rest


def test_a_peer_that_times_out_gets_no_more_work_and_the_rest_falls_back() -> None:
    blocks = ids(80)
    plan = FetchPlan(blocks, {"stall": blocks}, Limits(bench_s=2.0))

    def outcome(job: Assignment, n: int) -> Outcome:
        return Failure.TIMEOUT if job.source == "stall" else None

    # A stalled peer answers nothing until the read timeout (3 s).
    sim = Sim(plan, {APPLIANCE: 0.5, "stall": 3.0}, outcome, workers=10, shared=False)
    took = sim.run()
    verdicts = [v for job, r, v in sim.log if r is Failure.TIMEOUT]
    assert verdicts and set(verdicts) == {Verdict.BENCHED}
    assert sim.requests["stall"] <= Limits().peer_in_flight
    assert used(sim) == Counter({APPLIANCE: 80})
    # The appliance alone: 80 x 0.5 s over 6 slots ~ 6.7 s; the stall costs a few
    # seconds at most, not a wait per block.
    assert took < 80 * 0.5 / 6 + 4.0


def test_strikes_bench_then_drop_and_a_bench_counts_once() -> None:
    blocks = ids(10)
    plan = FetchPlan(blocks, {"p": blocks}, Limits(bench_s=5.0, prior_s=0.01,
                                                   appliance_in_flight=1))
    first = [plan.take(0.0) for _ in range(3)]
    assert [j.source for j in first if j] == ["p", APPLIANCE, "p"]
    a, _, c = first
    assert a is not None and c is not None
    assert plan.failed(a, 3.0, Failure.TIMEOUT) is Verdict.BENCHED
    assert plan.failed(c, 3.0, Failure.TIMEOUT) is Verdict.BENCHED   # same trouble
    assert all(j is None or j.source == APPLIANCE for j in [plan.take(4.0)])
    later = plan.take(8.5)        # the bench is over; the peer is asked again
    assert later is not None and later.source == "p"
    assert plan.failed(later, 9.0, Failure.ERROR) is Verdict.DROPPED
    assert plan.dropped() == ["p"]


def test_while_a_peer_hangs_new_work_moves_to_the_appliance_before_the_timeout() -> None:
    blocks = ids(200)
    plan = FetchPlan(blocks, {"hang": blocks})

    def outcome(job: Assignment, n: int) -> Outcome:
        return Failure.TIMEOUT if job.source == "hang" else None

    sim = Sim(plan, {APPLIANCE: 0.05, "hang": 3.0}, outcome, workers=10, shared=False)
    sim.run()
    assert used(sim) == Counter({APPLIANCE: 200})
    assert sim.requests["hang"] <= 8     # its first few; it is never fed for 3 s


def test_all_peers_gone_falls_back_to_the_appliance() -> None:
    blocks = ids(50)
    plan = FetchPlan(blocks, {"a": blocks, "b": blocks[:10]}, Limits(bench_s=0.3))

    def outcome(job: Assignment, n: int) -> Outcome:
        if job.source == "a":
            return Failure.ERROR
        if job.source == "b":
            return Failure.REFUSED
        return None

    sim = Sim(plan, {APPLIANCE: 0.2, "a": 0.01, "b": 0.01}, outcome)
    sim.run()
    assert sorted(plan.dropped()) == ["a", "b"]
    assert used(sim) == Counter({APPLIANCE: 50})


def test_a_straggler_is_reissued_once_and_its_late_copy_ignored() -> None:
    blocks = ids(20)
    plan = FetchPlan(blocks, {"p": blocks})
    slow_block = blocks[0]
    seconds = {APPLIANCE: 0.05, "p": 0.05}

    sim = Sim(plan, seconds, workers=4, shared=False)
    original_take = plan.take

    def take(now: float) -> Assignment | None:
        job = original_take(now)
        if job is not None and job.block_id == slow_block and not job.duplicate:
            seconds[job.source] = 30.0     # this one request hangs for 30 s
        elif job is not None:
            seconds[job.source] = 0.05
        return job

    plan.take = take          # type: ignore[method-assign]
    sim.run()
    copies = [(job, ok) for job, r, ok in sim.log if job.block_id == slow_block]
    assert len(copies) == 2
    assert [job.duplicate for job, ok in copies if ok is True] == [True]
    assert sim.now < 5.0


def test_a_peer_added_while_the_appliance_runs_takes_over_the_rest() -> None:
    blocks = ids(100)
    plan = FetchPlan(blocks, {})
    sim = Sim(plan, {APPLIANCE: 0.3, "late": 0.02}, workers=10)
    original_take = plan.take

    def take(now: float) -> Assignment | None:
        if now >= 0.5 and "late" not in plan.peers():
            assert plan.add_peer("late", [*blocks[::2], "f" * 64], now)
            assert not plan.add_peer("late", blocks, now)
        return original_take(now)

    plan.take = take          # type: ignore[method-assign]
    sim.run()
    counts = used(sim)
    assert sum(counts.values()) == 100
    late = [job.block_id for job, *_ in sim.log if job.source == "late"]
    assert late and set(late) <= set(blocks[::2])
    assert counts["late"] > 35


def test_local_hits_count_as_local_not_as_speed() -> None:
    blocks = ids(4)
    plan = FetchPlan(blocks, {})
    job = plan.take(0.0)
    assert job is not None and job.source == APPLIANCE
    assert plan.succeeded(job, 0.001, fetched=False)
    assert plan.local == 1 and plan.served == {}
    assert plan.seconds_per_block(APPLIANCE, 0.001) == pytest.approx(
        Limits().prior_s + 0.001)


def test_the_appliance_cannot_fail_through_the_plan_nor_be_a_peer() -> None:
    plan = FetchPlan(ids(1), {})
    job = plan.take(0.0)
    assert job is not None
    with pytest.raises(ValueError):
        plan.failed(job, 1.0, Failure.ERROR)
    with pytest.raises(ValueError):
        FetchPlan(ids(1), {APPLIANCE: ids(1)})


failures: st.SearchStrategy[Outcome] = st.sampled_from([None, None, None, *Failure])


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 60), peers=st.integers(0, 4), data=st.data())
def test_any_mix_of_failures_ends_with_every_block_once(n: int, peers: int,
                                                        data: st.DataObject) -> None:
    blocks = ids(n)
    names = [f"p{i}" for i in range(peers)]
    holdings = {name: data.draw(st.lists(st.sampled_from(blocks), unique=True))
                for name in names}
    plan = FetchPlan(blocks, holdings)
    script: list[Outcome] = data.draw(st.lists(failures, min_size=1, max_size=50))
    speeds = {APPLIANCE: 0.1, **{name: data.draw(st.floats(0.01, 3.0)) for name in names}}

    def outcome(job: Assignment, k: int) -> Outcome:
        if job.source == APPLIANCE:
            return None
        assert job.block_id in holdings[job.source]
        return script[(k + len(job.source)) % len(script)]

    sim = Sim(plan, speeds, outcome, workers=data.draw(st.integers(1, 20)),
              shared=data.draw(st.booleans()))
    sim.run()
    first = Counter(job.block_id for job, r, ok in sim.log if r is None and ok is True)
    assert first == Counter(blocks)
    assert plan.blocks_from_peers + plan.served.get(APPLIANCE, 0) == n
