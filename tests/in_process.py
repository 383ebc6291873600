"""Run a click command line (`cairn`, `cairnd`) inside the test process, as if it were the
binary: same arguments, environment, exit code, stdout and stderr — without paying for a
new interpreter and its imports on every call.

Rules, so that an in-process run proves what a subprocess run proved:
- The command runs in a worker thread with its own `trio.run` (a test may itself be running
  under trio; signal handlers stay the main thread's). `timeout` bounds the wait.
- One in-process command at a time (a lock): stdin/stdout/stderr, `os.environ` and the
  timezone are process-wide while it runs, and restored afterwards.
- The environment is replaced, not merged: exactly ENV is visible, as for a child process.
- stdin is empty and not a terminal (like DEVNULL): no prompt, no progress bar.
- An exception that escapes the command is printed to stderr as Python prints it
  (`Traceback (most recent call last): ...`) with exit code 1, so `"Traceback" not in
  stderr` checks keep their teeth; warnings logged while it runs reach stderr as the
  binary's last-resort handler would print them (the test process has pytest's handlers).

What in-process runs cannot show is kept for subprocesses (agent_helpers.run_cairn_binary,
cairnd_helpers.run_cairnd): signals, a killed process, `cairn sync` running on its own, and
the `python -m` entry points themselves.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence

import click
from click.testing import CliRunner

_one_at_a_time = threading.Lock()


class _LastResort(logging.Handler):
    """What logging prints with no handler configured: WARNING and up, message only, to the
    stderr of the moment (the runner's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except Exception:   # a log line must never fail the command
            self.handleError(record)


def _environment_changes(env: Mapping[str, str]) -> dict[str, str | None]:
    """CliRunner's env sets keys and removes those mapped to None: replace the whole of it."""
    changes: dict[str, str | None] = {key: None for key in os.environ if key not in env}
    changes.update(env)
    return changes


def run_click(command: click.Command, prog_name: str, argv: Sequence[str],
              env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`PROG_NAME ARGV...` run in-process; a CompletedProcess like subprocess.run's."""
    outcome: list[subprocess.CompletedProcess[str]] = []

    def invoke() -> None:
        runner = CliRunner()
        old_tz = os.environ.get("TZ")
        handler = _LastResort()
        root = logging.getLogger()
        with runner.isolation(env=_environment_changes(env)) as (out, err, _):
            retz = os.environ.get("TZ") != old_tz
            if retz:
                time.tzset()
            root.addHandler(handler)
            try:
                code = _exit_code(command, prog_name, argv)
            finally:
                root.removeHandler(handler)
            stdout, stderr = out.getvalue(), err.getvalue()
        if retz:
            time.tzset()
        outcome.append(subprocess.CompletedProcess(
            [prog_name, *argv], code, stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace")))

    with _one_at_a_time:
        worker = threading.Thread(target=invoke, name=f"{prog_name} in-process", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise AssertionError(f"`{prog_name} {' '.join(argv)}` did not finish in "
                                 f"{timeout} s")
    return outcome[0]


def _exit_code(command: click.Command, prog_name: str, argv: Sequence[str]) -> int:
    """Run the command as its entry point does (standalone: click prints usage errors and
    exits); the exit status, with an escaping exception printed like Python prints it."""
    try:
        command.main(args=list(argv), prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(f"{exc.code}\n")
        return 1
    except BaseException:   # reported as the interpreter would
        sys.stderr.write("".join(traceback.format_exc()))
        return 1
    return 0
