"""Running blocking per-block work (read, hash, encrypt, send — or fetch, verify, decrypt,
write) in worker threads, several blocks in flight, from trio.

Each job runs whole in one thread, so a block's bytes never travel back through the event
loop; hashing, AES-GCM and the stdlib's TLS release the GIL on large buffers, so the jobs
overlap on every core. At most PARALLEL jobs run at once, which bounds memory: a job holds
one plaintext and one ciphertext block (2 x 4 MiB), whatever the file's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from agent.errors import CairnAgentError

J = TypeVar("J")
R = TypeVar("R")
DEFAULT_PARALLEL = 4


async def run_jobs(jobs: Sequence[J], work: Callable[[J], R], *,
                   parallel: int = DEFAULT_PARALLEL,
                   done: Callable[[J, R], None] | None = None) -> None:
    """WORK(job) for every job in worker threads, PARALLEL at a time; DONE(job, result) on
    the trio side after each. The first failure stops the rest and is raised as itself
    (not inside an exception group); jobs already running finish their block first."""
    send, receive = trio.open_memory_channel[J](math.inf)
    for job in jobs:
        send.send_nowait(job)
    send.close()

    async def worker() -> None:
        async for job in receive:
            result = await trio.to_thread.run_sync(work, job)
            if done is not None:
                done(job, result)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(min(parallel, len(jobs))):
                nursery.start_soon(worker)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a group: our own errors first (they explain themselves),
    then anything else; cancellations last."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for leaf in leaves:
        if isinstance(leaf, CairnAgentError):
            return leaf
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0]
