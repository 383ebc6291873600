"""KeyedLocks: per-key locks, many taken at once in one order, gone when nobody holds them."""

from __future__ import annotations

import trio

from appliance.locks import KeyedLocks


async def test_hold_all_excludes_other_holders_of_any_key_and_cleans_up() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    async def batch(name: str, keys: list[str], hold_s: float) -> None:
        async with locks.hold_all(keys):
            order.append(f"{name} in")
            await trio.sleep(hold_s)
            order.append(f"{name} out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(batch, "first", ["b", "a", "c", "a"], 0.05)
        await trio.sleep(0.01)
        nursery.start_soon(batch, "second", ["c", "z"], 0.0)       # shares c: waits
        nursery.start_soon(batch, "third", ["x", "y"], 0.0)        # shares nothing
    assert order.index("first out") < order.index("second in")
    assert order.index("third in") < order.index("first out")
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_lock_behind() -> None:
    locks = KeyedLocks()
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with locks.hold("k"):
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        with trio.move_on_after(0.02) as scope:
            async with locks.hold_all(["j", "k"]):
                raise AssertionError("k is held: this must not be reached")
        assert scope.cancelled_caught
        assert len(locks) == 1          # only the holder's k; j was released
        release.set()
    assert len(locks) == 0
    async with locks.hold_all(["j", "k"]):   # both free again
        assert len(locks) == 2
