"""agent/stopping.py: the first SIGTERM or SIGINT cancels a command's work with its clean-up
run and is returned; a result or an error of the work comes through unchanged; a second
signal during a clean-up that hangs exits at once (in a child process: it ends the process).
The signals are real ones, sent to this process while the receiver is installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from agent.errors import UsageError
from agent.stopping import Stopped, until_signalled


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_cancels_the_work_after_its_clean_up(sig: signal.Signals) -> None:
    cleaned: list[str] = []

    async def work() -> str:
        try:
            os.kill(os.getpid(), sig)
            await trio.sleep_forever()
        finally:
            cleaned.append("closed")
        return "never"

    stopped = await until_signalled(work)
    assert stopped == Stopped(sig)
    assert (stopped.name, stopped.exit_code) == (sig.name, 128 + sig)
    assert cleaned == ["closed"]


async def test_a_result_or_an_error_comes_through() -> None:
    async def done() -> int:
        await trio.lowlevel.checkpoint()
        return 42

    async def refused() -> int:
        raise UsageError("no")

    assert await until_signalled(done) == 42
    with pytest.raises(UsageError, match="no"):
        await until_signalled(refused)


def test_a_second_signal_exits_at_once() -> None:
    script = textwrap.dedent("""
        import sys, trio
        from agent.stopping import until_signalled

        async def stuck() -> None:
            try:
                print("ready", flush=True)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):   # a clean-up that hangs
                    print("cleaning", flush=True)
                    await trio.sleep_forever()

        trio.run(until_signalled, stuck)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        child.send_signal(signal.SIGTERM)
        assert child.stdout.readline() == "cleaning\n"
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 128 + signal.SIGINT
        assert child.stderr is not None
        assert child.stderr.read() == "cairn: SIGINT again: stopping at once\n"
    finally:
        child.kill()
        child.communicate(timeout=30)
