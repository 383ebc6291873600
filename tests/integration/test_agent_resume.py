"""`cairn put` and `cairn get` of a 1 GiB file, killed with SIGKILL midway, then run again:
the second run moves only what the first did not, and the result is the original file. The
same for a run stopped by SIGTERM or Ctrl-C, which also ends cleanly: one line on stderr and
exit 143 or 130 (128 + the signal), no traceback.

One real appliance (`cairnd serve` on 127.0.0.1) and one joined agent for the module; the
run that is killed is a real `cairn` process, the run after it is in-process. The
appliance's own database says which blocks it holds (`blocks.stored`, read-only), and the
interrupted download's temporary file says which blocks reached the device: the second run
must move exactly the rest, no more (resumption works) and no fewer (nothing is trusted that
was not complete).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from agent_helpers import CAIRN, agent_env, make_user, run_cairn
from cairnd_helpers import RunningAppliance, Served, database_rows, serving

from agent.crypto.blocks import BLOCK_SIZE
from agent.download import PART_SUFFIX
from appliance.config import ApplianceConfig
from appliance.home import init_home

pytestmark = pytest.mark.slow   # a GiB each way
FILE_BLOCKS = 256  # 1 GiB in 4 MiB blocks
# Interrupt once this many blocks have moved: enough to prove resumption, early enough that
# the first run is far from done on any machine.
INTERRUPT_AFTER_BLOCKS = 8
WAIT_S = 180  # bound on any wait for the agent or the appliance to get somewhere
SENT = re.compile(r"sent (\d+) of (\d+) blocks")
FETCHED = re.compile(r"fetched (\d+) of (\d+) blocks")


@dataclass
class Stage:
    config: ApplianceConfig
    appliance: RunningAppliance
    agent: Path
    big: Path
    digest: bytes


def write_distinct_blocks(path: Path, blocks: int) -> bytes:
    """BLOCKS random 4 MiB blocks, no two alike (a repeated block would be deduplicated);
    their BLAKE3. One random block is made and each copy gets its own random first 32 bytes,
    which is as distinct as fully random blocks for a convergent block store, and quick."""
    body = os.urandom(BLOCK_SIZE)
    digest = blake3.blake3()
    with path.open("wb") as out:
        for _ in range(blocks):
            block = os.urandom(32) + body[32:]
            digest.update(block)
            out.write(block)
    return digest.digest()


def file_digest(path: Path) -> bytes:
    digest = blake3.blake3()
    with path.open("rb") as source:
        while chunk := source.read(BLOCK_SIZE):
            digest.update(chunk)
    return digest.digest()


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    base = tmp_path_factory.mktemp("resume")
    config = init_home(base / "appliance", disks=3, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    big = base / "big.bin"
    digest = write_distinct_blocks(big, FILE_BLOCKS)
    try:
        with serving(config.home) as appliance:
            agent = make_user(Served(config, appliance), "alice").join(base / "agent")
            yield Stage(config, appliance, agent, big, digest)
    finally:
        # Gigabytes: do not leave them to pytest's retention of old temporary folders.
        for path in (big, *base.rglob("*.out"), *base.rglob(f"*{PART_SUFFIX}")):
            path.unlink(missing_ok=True)
        for disk in config.store.disks:
            subprocess.run(["rm", "-rf", str(disk.path)], check=False, timeout=60)


def stored_blocks(config: ApplianceConfig) -> int:
    """Blocks the appliance holds durably, from its database (read-only, beside the server)."""
    [(count,)] = database_rows(config, "SELECT count(*) FROM blocks WHERE stored = 1")
    return int(count)


def settled(count: Callable[[], int], quiet_s: float = 1.0) -> int:
    """COUNT() once it has not changed for QUIET_S (a block whose last byte arrived as the
    agent died is still being committed)."""
    deadline = time.monotonic() + 30
    last = count()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = count()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still changing after 30 s: {last}")


def start_cairn(home: Path, *args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*CAIRN, "--home", str(home), *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=agent_env())


def kill_when(process: subprocess.Popen[str], ready: Callable[[], bool],
              check: Callable[[], None] = lambda: None, sig: int = signal.SIGKILL) -> str:
    """Send SIG (SIGKILL) to PROCESS as soon as READY() (polled, with CHECK() run on every
    poll); fail if it finishes first or nothing happens within WAIT_S. Its stderr."""
    deadline = time.monotonic() + WAIT_S
    try:
        while not ready():
            check()
            if process.poll() is not None:
                _, stderr = process.communicate()
                raise AssertionError(f"{process.args!r} ended (exit {process.returncode}) "
                                     f"before it could be interrupted: {stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{process.args!r} made no progress in {WAIT_S} s")
            time.sleep(0.02)
        check()
    finally:
        if process.poll() is None:
            os.kill(process.pid, sig)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), stderr
    return stderr


def succeeded(result: subprocess.CompletedProcess[str], summary: re.Pattern[str]
              ) -> tuple[int, int]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    match = summary.search(result.stdout)
    assert match is not None, result.stdout
    return int(match[1]), int(match[2])


def uploaded(stage: Stage) -> None:
    """The big file is on the appliance (when the get test runs without the put test)."""
    if stored_blocks(stage.config) < FILE_BLOCKS:
        succeeded(run_cairn(stage.agent, "put", stage.big, "/big.bin"), SENT)


def test_put_killed_midway_sends_only_the_missing_blocks(stage: Stage) -> None:
    assert stored_blocks(stage.config) == 0
    put = start_cairn(stage.agent, "put", stage.big, "/big.bin")
    kill_when(put, lambda: stored_blocks(stage.config) >= INTERRUPT_AFTER_BLOCKS)
    held = settled(lambda: stored_blocks(stage.config))
    assert INTERRUPT_AFTER_BLOCKS <= held < FILE_BLOCKS

    sent, total = succeeded(run_cairn(stage.agent, "put", stage.big, "/big.bin"), SENT)

    assert total == FILE_BLOCKS
    assert sent == total - held < total
    assert stored_blocks(stage.config) == held + sent == FILE_BLOCKS
    assert "big.bin" in run_cairn(stage.agent, "ls", "/").stdout


def blocks_matching(part: Path, original: Path) -> int:
    """How many of PART's 4 MiB blocks are already those of ORIGINAL, at the same offset."""
    matching = 0
    with part.open("rb") as have, original.open("rb") as want:
        while block := want.read(BLOCK_SIZE):
            matching += have.read(BLOCK_SIZE) == block
    return matching


def test_get_killed_midway_fetches_only_the_missing_blocks(stage: Stage) -> None:
    uploaded(stage)
    folder = stage.big.parent / "downloads"  # removed with the stage, gigabytes and all
    folder.mkdir()
    target = folder / "big.out"
    old_content = b"the previous, complete version of this file\n"
    target.write_bytes(old_content)
    old_identity = (target.stat().st_ino, target.stat().st_size, target.stat().st_mtime_ns)

    def parts() -> list[Path]:
        return sorted(folder.glob(f".big.out.*-v*{PART_SUFFIX}"))

    def blocks_landed() -> bool:
        # The temporary file has its full size at once (sparse): count allocated bytes.
        return any(p.stat().st_blocks * 512 >= INTERRUPT_AFTER_BLOCKS * BLOCK_SIZE
                   for p in parts())

    def target_untouched() -> None:
        st = target.stat()
        assert (st.st_ino, st.st_size, st.st_mtime_ns) == old_identity, \
            "the target changed before the download was complete"

    get = start_cairn(stage.agent, "get", "/big.bin", target)
    kill_when(get, blocks_landed, check=target_untouched)
    assert target.read_bytes() == old_content
    [part] = parts()
    held = blocks_matching(part, stage.big)
    assert INTERRUPT_AFTER_BLOCKS <= held < FILE_BLOCKS

    fetched, total = succeeded(run_cairn(stage.agent, "get", "/big.bin", target), FETCHED)

    assert total == FILE_BLOCKS
    assert fetched == total - held < total
    assert file_digest(target) == stage.digest
    assert parts() == []
    assert sorted(p.name for p in folder.iterdir()) == ["big.out"]


# --- stopped by a signal: a clean end, and the next run resumes ------------------------------

STOPPED_BLOCKS = 64   # 256 MiB: room to stop it midway


def interrupted_line(sig: signal.Signals) -> str:
    return f"cairn: interrupted by {sig.name}; run the same command again to resume"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_put_stopped_by_a_signal_ends_cleanly_and_resumes(stage: Stage,
                                                          sig: signal.Signals) -> None:
    source = stage.big.parent / f"stopped-{sig.name}.bin"
    write_distinct_blocks(source, STOPPED_BLOCKS)
    before = settled(lambda: stored_blocks(stage.config))
    put = start_cairn(stage.agent, "put", source, f"/{source.name}")
    stderr = kill_when(put, lambda: stored_blocks(stage.config) >= before
                       + INTERRUPT_AFTER_BLOCKS, sig=sig)
    assert stderr == interrupted_line(sig) + "\n"
    held = settled(lambda: stored_blocks(stage.config)) - before
    assert INTERRUPT_AFTER_BLOCKS <= held < STOPPED_BLOCKS

    sent, total = succeeded(run_cairn(stage.agent, "put", source, f"/{source.name}"), SENT)
    assert (sent, total) == (STOPPED_BLOCKS - held, STOPPED_BLOCKS)
    source.unlink()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_get_stopped_by_a_signal_ends_cleanly_and_resumes(stage: Stage,
                                                          sig: signal.Signals) -> None:
    uploaded(stage)
    folder = stage.big.parent / f"stopped-{sig.name}"   # removed with the stage
    folder.mkdir()
    target = folder / "big.out"

    def blocks_landed() -> bool:
        return any(p.stat().st_blocks * 512 >= INTERRUPT_AFTER_BLOCKS * BLOCK_SIZE
                   for p in folder.glob(f"*{PART_SUFFIX}"))

    get = start_cairn(stage.agent, "get", "/big.bin", target)
    assert kill_when(get, blocks_landed, sig=sig) == interrupted_line(sig) + "\n"
    assert not target.exists()
    [part] = folder.glob(f"*{PART_SUFFIX}")
    held = blocks_matching(part, stage.big)
    assert INTERRUPT_AFTER_BLOCKS <= held < FILE_BLOCKS

    fetched, total = succeeded(run_cairn(stage.agent, "get", "/big.bin", target), FETCHED)
    assert (fetched, total) == (FILE_BLOCKS - held, FILE_BLOCKS)
    assert file_digest(target) == stage.digest
    assert sorted(p.name for p in folder.iterdir()) == ["big.out"]
