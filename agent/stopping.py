"""Stopping a command cleanly on SIGTERM and SIGINT.

A command's async work runs under `until_signalled`. The first SIGTERM or SIGINT cancels the
work: every `finally` and `async with` on the way out runs — the event stream and the HTTP
clients are closed, worker threads finish the block in hand, the sync database is closed —
and the signal is returned instead of a result. What the command does with it is its own
choice: `cairn sync` (which runs until stopped) exits 0; a transfer that did not finish exits
128 + the signal's number (130 for SIGINT, 143 for SIGTERM), its partial state kept for the
next run to resume from. A second signal while the first one's clean-up runs exits at once
(exit 128 + N, like a kill: sync state and partial downloads are crash-safe).

Signals reach only the main thread, so elsewhere (commands run in a test's worker thread)
the work simply runs.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

T = TypeVar("T")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Stopped:
    """The work was cancelled by signal SIGNUM."""

    signum: int

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a command that a signal ended."""
        return 128 + self.signum


class Interrupted(Exception):
    """Raised by a command that a signal stopped before it was done; the command line exits
    with `stopped.exit_code`."""

    def __init__(self, stopped: Stopped, message: str) -> None:
        super().__init__(message)
        self.stopped = stopped
        self.message = message


async def until_signalled(work: Callable[[], Awaitable[T]]) -> T | Stopped:
    """WORK's result, or Stopped once SIGTERM or SIGINT cancelled it (see the module doc).
    An error WORK raises is raised, unless a signal came first: then the error is taken
    for part of being cancelled, and Stopped is returned."""
    if threading.current_thread() is not threading.main_thread():
        return await work()
    results: list[T] = []
    errors: list[Exception] = []
    stopped: list[Stopped] = []
    work_scope = trio.CancelScope()
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                with work_scope:
                    try:
                        results.append(await work())
                    except Exception as exc:
                        errors.append(exc)
                nursery.cancel_scope.cancel()      # done: stop listening for signals

            nursery.start_soon(run)
            async for signum in signals:
                if stopped:
                    _exit_now(Stopped(signum))
                stopped.append(Stopped(signum))
                work_scope.cancel()
    if results:
        return results[0]           # done before the signal could stop it
    if stopped:
        return stopped[0]
    raise errors[0]


def _exit_now(stopped: Stopped) -> None:
    os.write(2, f"cairn: {stopped.name} again: stopping at once\n".encode())
    os._exit(stopped.exit_code)
