"""Disk calls with a deadline: a disk that does not answer is skipped, not waited on.

Why: a thread blocked in a read, write or fsync on a hung disk (a dying drive retrying a
sector, a stuck USB bridge or network mount, a FUSE daemon that stopped answering) cannot
be interrupted; it returns when the kernel gives up, after minutes or never. The store used
to make those calls in the request's own thread, one disk after another, so one hung disk
hung every request that touched it, and `cairnd disks` and shutdown with them.

How: no caller ever waits on a disk call for more than DISK_TIMEOUT_S. Two ways, one rule:

- A store operation (get, put, ...) runs whole in a worker thread (`Operations.run`), and
  makes its disk calls there, inline, each registered with its disk. The caller waits for
  the result; if the worker has been in one disk call longer than the deadline, the caller
  gives the worker up, and runs the operation again in another worker, which skips that
  disk: one thread hand-off per operation, not one per disk call (~25 us each here: a
  small get makes three disk calls).
- Any other disk call (a probe, a listing, the shard writes a put makes at once from the
  writer pool) runs in one of the disk's own threads (`DiskCalls.run`), the caller waiting
  at most the deadline.

Either way, a call past its deadline is left to finish on its own, and while it is out the
disk is *hung*: every new call to it fails at once (DiskTimeout), so a request pays the
deadline at most once per disk that hangs, and stuck threads stay bounded (calls stop
reaching a hung disk; each pool has a fixed size). When the last such call returns, the
disk is used again. The threads are daemon threads: a stopping process must not wait for a
disk that may never answer (a ThreadPoolExecutor joins its threads at exit).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

T = TypeVar("T")
DISK_TIMEOUT_S = 5.0   # a disk call not answered by then is given up on
DISK_THREADS = 8       # threads per disk for calls made outside an operation
OPERATION_THREADS = 64  # workers running store operations (a few may be stuck)
POLL_S = 0.25          # how often a caller past the deadline looks for a stuck call

_local = threading.local()   # .inline: this thread is an operation's worker


class DiskTimeout(TimeoutError):
    """A disk call did not answer within its deadline (`new`: this call was given up on),
    or the disk is hung (an earlier call is still out past its own; this one never ran).
    Internal to the storage package: disk.py raises a DiskError in its place."""

    def __init__(self, message: str, *, new: bool) -> None:
        super().__init__(message)
        self.new = new


@dataclass(frozen=True)
class Overrun:
    action: str
    started: float   # time.monotonic()

    def describe(self) -> str:
        return (f"not answering ({self.action} has been waiting "
                f"{time.monotonic() - self.started:.0f} s)")


class _DaemonPool:
    """At most LIMIT daemon threads, started as needed, running submitted calls."""

    def __init__(self, name: str, limit: int) -> None:
        self._name, self._limit = name, limit
        self._tasks: queue.SimpleQueue[tuple[Future[object], Callable[[], object]] | None] \
            = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0
        self._closed = False

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise DiskTimeout("the disk is closed", new=False)
            self._tasks.put((future, fn))   # type: ignore[arg-type]
            if self._idle == 0 and self._threads < self._limit:
                self._threads += 1
                threading.Thread(target=self._work, name=self._name, daemon=True).start()
            else:
                self._idle -= 1   # an idle thread takes it (or the next one freed)
        return future

    def _work(self) -> None:
        while (item := self._tasks.get()) is not None:
            future, fn = item
            if not future.set_running_or_notify_cancel():
                with self._lock:
                    self._idle += 1
                continue
            try:
                result = fn()
            except BaseException as exc:   # the caller's to handle
                self._free()
                future.set_exception(exc)
            else:
                self._free()   # before the caller wakes: its next call reuses this thread
                future.set_result(result)

    def _free(self) -> None:
        with self._lock:
            self._idle += 1

    def close(self) -> None:
        """Let the threads end (stuck ones once their call returns)."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._tasks.put(None)


class DiskCalls:
    """One disk's calls: made with a deadline, and the ones still out past it. Thread-safe."""

    def __init__(self, name: str, timeout: float | None = None,
                 threads: int | None = None) -> None:
        self.timeout = DISK_TIMEOUT_S if timeout is None else timeout
        self._pool = _DaemonPool(f"cairn-{name}", DISK_THREADS if threads is None else threads)
        self._lock = threading.Lock()
        self._overruns: dict[int, Overrun] = {}   # id(future) -> pooled call given up on
        # thread id -> (action, started) of an operation's call: set and removed by that
        # thread alone (a dict item is atomic under the GIL), read under the lock
        self._inline: dict[int, tuple[str, float]] = {}

    def hung(self) -> Overrun | None:
        """The oldest call still out past its deadline; None when the disk answers."""
        if not self._overruns and not self._inline:   # the usual case, asked per call
            return None
        horizon = time.monotonic() - self.timeout
        # Other threads add and remove their _inline items without the lock: copy it in
        # one step (tuple() of a dict's values runs under the GIL, a generator does not;
        # iterating it live raised "dictionary changed size" under load, a 500).
        inline = tuple(self._inline.values())
        with self._lock:
            late = [*self._overruns.values(),
                    *(Overrun(*o) for o in inline if o[1] < horizon)]
        return min(late, key=lambda o: o.started, default=None)

    def stuck(self, thread_id: int) -> Overrun | None:
        """The call the thread has been making past its deadline, if any."""
        call = self._inline.get(thread_id)
        return Overrun(*call) if call is not None and \
            time.monotonic() - call[1] > self.timeout else None

    def run(self, action: str, fn: Callable[[], T]) -> T:
        """FN's result (or exception); DiskTimeout if the disk is hung, or if FN runs in
        the disk's threads (outside an operation) and does not return within the
        deadline."""
        stuck = self.hung()
        if stuck is not None:
            raise DiskTimeout(stuck.describe(), new=False)
        if getattr(_local, "inline", False):
            return self._inline_call(action, fn)
        started = time.monotonic()
        future = self._pool.submit(fn)
        try:
            return future.result(self.timeout)
        except (FutureTimeout, CancelledError):
            pass
        if future.cancel():
            raise DiskTimeout(f"{action}: no free thread within {self.timeout:g} s",
                              new=True) from None
        with self._lock:
            if not future.done():
                self._overruns[id(future)] = Overrun(action, started)
                future.add_done_callback(self._returned)
        if future.done():
            return future.result()   # it returned just now after all
        raise DiskTimeout(f"{action}: no answer within {self.timeout:g} s", new=True) from None

    def _inline_call(self, action: str, fn: Callable[[], T]) -> T:
        me = threading.get_ident()
        self._inline[me] = (action, time.monotonic())
        try:
            return fn()
        finally:
            del self._inline[me]

    def _returned(self, future: Future[T]) -> None:
        with self._lock:
            self._overruns.pop(id(future), None)

    def close(self) -> None:
        self._pool.close()


class Operations:
    """Workers for store operations (see the module doc). Thread-safe."""

    def __init__(self, timeout: float | None = None, threads: int | None = None) -> None:
        self._timeout = timeout
        self._pool = _DaemonPool("cairn-store",
                                 OPERATION_THREADS if threads is None else threads)

    @property
    def timeout(self) -> float:
        return DISK_TIMEOUT_S if self._timeout is None else self._timeout

    def run(self, fn: Callable[[], T], disks: Sequence[DiskCalls],
            on_stuck: Callable[[int, DiskTimeout], None]) -> T:
        """FN's result, made in a worker whose disk calls are inline. A worker stuck in a
        call to DISKS[i] past the deadline is given up (`on_stuck(i, error)` is told) and
        FN runs again, at most once per disk; DiskTimeout if no worker could be had.
        Inside an operation already, FN simply runs."""
        if getattr(_local, "inline", False):
            return fn()
        for _ in range(len(disks) + 1):
            worker: list[int] = []   # the worker's thread id, once it has started
            future = self._pool.submit(partial(self._work, fn, worker))
            stuck = self._wait(future, worker, disks)
            if stuck is None:
                return future.result()
            on_stuck(*stuck)
        raise DiskTimeout("one disk after another stopped answering", new=False)

    @staticmethod
    def _work(fn: Callable[[], T], worker: list[int]) -> T:
        worker.append(threading.get_ident())
        _local.inline = True
        try:
            return fn()
        finally:
            _local.inline = False

    def _wait(self, future: Future[T], worker: list[int], disks: Sequence[DiskCalls]
              ) -> tuple[int, DiskTimeout] | None:
        """Wait for FUTURE; None once it is done, or the disk its worker is stuck in."""
        began = time.monotonic()
        wait = self.timeout
        while True:
            try:
                future.result(wait)
                return None
            except (FutureTimeout, CancelledError):
                pass
            except BaseException:
                return None   # done: the caller takes the exception from the future
            wait = POLL_S
            if not worker:
                if time.monotonic() - began > self.timeout and future.cancel():
                    raise DiskTimeout(f"no free worker within {self.timeout:g} s",
                                      new=False) from None
                continue
            for index, calls in enumerate(disks):
                call = calls.stuck(worker[0])
                if call is not None:
                    return index, DiskTimeout(
                        f"{call.action}: no answer within {self.timeout:g} s", new=True)
