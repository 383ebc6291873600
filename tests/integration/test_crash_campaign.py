"""A crash campaign: `kill -9` at random instants, round after round, and after each one a
check that nothing acknowledged was lost.

One appliance home (4 disks, 2+1, garbage collection with a 0.6 s grace every 0.2 s, so
that it runs through everything), served on one fixed address and started again after
each kill; two `cairn sync` devices of one user on /sync; a third agent home for
`cairn put` / `cairn get`; and a raw API device of another user (crash_helpers.Raw).
Each round picks a scenario and a random instant, starts the work, sends SIGKILL at that
instant to the appliance (`cairnd serve`, and `cairnd scrub` when it runs) or to an agent
(`cairn sync`, `cairn put`, `cairn get`), starts again only what was killed, and checks:

- `cairnd fsck --home H --json` is clean: offline right after an appliance kill, beside
  the serving appliance otherwise (crash_helpers.fsck_problems);
- every upload that was acknowledged reads back byte for byte: the raw files touched in
  the round and a sample of older ones (crash_helpers.Raw.check), every `cairn put` that
  exited 0 (`cairn get`), every file written into a synced folder;
- the sync folders converge to exactly what was written (conflicted copies only for a
  file written on both devices at once).

Scenarios: block uploads (PUT to signed URLs), node commits (creates, new versions,
moves, deletes), batch creates (POST /batch/files with inline blocks, POST /blocks), GC
(files made and deleted a grace period before the kill, and new files reusing their
blocks while it collects them), scrub, rebuild (a disk folder replaced by an empty one,
then scrub), repair (shards deleted, read degraded: the repair queue works at restart,
killed again), sync with the agent or the appliance killed, `cairn put` and `cairn get`
killed, and `cairn put` with the appliance killed.

CAIRN_CRASH_ROUNDS=N runs N rounds (default 100); CAIRN_CRASH_SEED=S replays the rounds'
choices of a run (the seed is printed; the interleaving with the processes is up to the
scheduler). The tally is printed (`pytest -s` shows it) and in any failure message.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import CAIRN, MakeUser, agent_env, joined, make_user, run_cairn, write
from api_helpers import add_user, enroll, make_root, new_node_id
from cairnd_helpers import (
    CAIRND,
    Served,
    cairnd_env,
    database_rows,
    free_port,
    run_cairnd_in_process,
)
from crash_helpers import (
    SMALL,
    UPLOADED_BLOCKS,
    Appliance,
    Dead,
    Raw,
    RawFile,
    Tally,
    b64,
    batch_work,
    block_id,
    blocks_of,
    commit_work,
    copy_of,
    fsck_problems,
    send,
    sync_problems,
    upload_work,
)
from storage_fixtures import shard_files
from sync_helpers import (
    Device,
    converged,
    devices_of,
    part_files,
    stop_all,
    tree_of,
    wait_converged,
    wait_for,
)

from appliance.home import init_home

ROUNDS = int(os.environ.get("CAIRN_CRASH_ROUNDS", "100"))
SEED = int(os.environ.get("CAIRN_CRASH_SEED", str(random.SystemRandom().randrange(10**9))))
GRACE_S = 0.6
RAW_FILES = 100                                    # live raw files kept, about
SYNC_DIRS = ("", "docs", "docs/old", "photos")
CONVERGE_S = 90
SCENARIOS = {   # name -> weight
    "block upload": 11, "node commit": 11, "batch create": 11, "gc": 9, "scrub": 7,
    "rebuild": 5, "repair": 5, "sync, agent killed": 14, "sync, appliance killed": 9,
    "put killed": 7, "get killed": 6, "put, appliance killed": 5,
}


def schedule(rng: random.Random, rounds: int) -> list[str]:
    """ROUNDS scenario names in a seeded order, each about as often as its weight says
    and, when there are enough rounds, at least once."""
    total = sum(SCENARIOS.values())
    names = [name for name, weight in SCENARIOS.items()
             for _ in range(max(1, round(weight * rounds / total)))]
    rng.shuffle(names)
    names = names[:rounds]
    names += rng.choices(list(SCENARIOS), list(SCENARIOS.values()), k=rounds - len(names))
    return names


# --- the campaign -----------------------------------------------------------------------

class Campaign:
    def __init__(self, base: Path, seed: int) -> None:
        self.base = base
        self.tally = Tally(seed)
        self.seed = seed
        self.config = init_home(base / "appliance", disks=4, data_shards=2, parity_shards=1,
                                reserve_free_bytes=0, listen="127.0.0.1:0")
        text = self.config.config_path.read_text()
        for old, new in (("grace_days = 7.0", f"grace_days = {GRACE_S / 86400!r}"),
                         ("interval_hours = 1.0", "interval_hours = 0.00005"),
                         ("advertise = true", "advertise = false")):
            assert old in text, old
            text = text.replace(old, new)
        self.config.config_path.write_text(text)
        self.appliance = Appliance(self.config, f"127.0.0.1:{free_port()}")
        self.appliance.start()
        url = self.appliance.url
        alice = make_user(Served(self.config, self.appliance.server), "alice")
        self.devices = devices_of(alice, base, "laptop", "desktop")
        for device in self.devices:
            device.extra = ("--remote", "/sync")
        self.porter = joined(base / "porter-home", url, alice.code(), name="porter")
        client = enroll(url, self.config.tls_certificate, add_user(self.config.home, "raw"))
        self.raw = Raw(client, self.config.tls_certificate, url)
        root = make_root(client)["id"]
        self.parents = [root] + [self.raw.call("POST", "/files", 201, json={
            "parent": root, "kind": "dir", "metadata": b64(b"dir%d" % i),
            "wrapped_key": b64(b"k")})["node"]["id"] for i in range(3)]
        self.expected: dict[str, bytes] = {}      # the sync folders' files
        self.puts: dict[str, bytes] = {}          # remote path -> what `cairn put` sent
        self.serial = 0
        self.problems: list[str] = []

    # -- life cycle --

    def seed_sync(self, rng: random.Random) -> None:
        laptop = self.devices[0]
        for _ in range(24):
            self.write(laptop, self.new_path(rng), rng.randbytes(rng.randint(10, 30_000)))
        self.start_agents()
        self.converge({}, "seed")
        self.stop_agents()

    def start_agents(self) -> None:
        """Both agents, started for a sync round and ready (their first line logged). They
        run only in sync rounds: an agent counts each appliance restart as one more
        failure in a row of its event stream (agent/sync/follow.py never resets the count
        after a stream that worked), so after 6 restarts a reader hears of a change up to
        a minute late (measured: 0.3 s after 0-2 restarts, 4, 12, 28, 57, 57 s after
        3-7), and every later round would wait for it."""
        self.start(*self.devices)

    def start(self, *devices: Device) -> None:
        """Start the agents of DEVICES and wait for their first line: an agent stopped
        while Python still starts has no handler for SIGTERM yet."""
        lines = [d.log_text().count(" with /sync as ") for d in devices]
        for device in devices:
            device.start()
        with self.tally.timed("agents starting"):
            wait_for(lambda: all(d.log_text().count(" with /sync as ") > n
                                 for d, n in zip(devices, lines, strict=True)),
                     60, "the agents to start")

    def stop_agents(self) -> None:
        """SIGTERM: each agent stops cleanly (exit 0) with no traceback logged."""
        for device in self.devices:
            code = device.stop()
            if code != 0 or "Traceback" in device.log_text():
                self.problems.append(f"{device.name}'s agent stopped with {code}: "
                                     f"{device.log_text()[-3000:]}")

    def close(self) -> None:
        for device in self.devices:
            if device.process is not None:
                device.stop(signal.SIGKILL)
        if self.appliance.running:
            self.appliance.kill()

    # -- killing --

    def workers(self, work: Callable[..., None], rng: random.Random, count: int,
                *args: Any) -> list[threading.Thread]:
        def body(worker_rng: random.Random) -> None:
            with contextlib.suppress(Dead):
                work(self.raw, worker_rng, self.parents, *args)
        threads = [threading.Thread(target=body, args=(random.Random(rng.random()),),
                                    daemon=True) for _ in range(count)]
        for thread in threads:
            thread.start()
        return threads

    def crash(self, threads: Sequence[threading.Thread] = (),
              also: Sequence[subprocess.Popen[str]] = ()) -> None:
        """SIGKILL the appliance (and ALSO, its other processes) now; once the workers
        gave up, fsck it offline and start it again."""
        self.appliance.kill()
        self.tally.kills["cairnd serve"] += 1
        for process in also:
            if process.poll() is None:
                process.kill()
                self.tally.kills["cairnd scrub"] += 1
            process.communicate(timeout=30)
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a worker did not stop"
        self.fsck("offline")
        with self.tally.timed("restarts"):
            self.appliance.start()
        self.raw.renew()

    def fsck(self, how: str) -> None:
        self.tally.fsck[how] += 1
        with self.tally.timed("fsck"):
            self.problems += [f"fsck ({how}): {p}" for p in fsck_problems(self.config)]

    # -- checks --

    def check_raw(self, rng: random.Random, sample: int = 5) -> None:
        with self.tally.timed("reading back"):
            self._check_raw(rng, sample)

    def _check_raw(self, rng: random.Random, sample: int) -> None:
        with self.raw.lock:
            touched = [self.raw.files[n] for n in self.raw.touched]
            self.raw.touched = set()
        older = [f for f in self.raw.live() if f not in touched]
        self.check_files(touched + rng.sample(older, min(sample, len(older))))
        self.problems += [f"raw client: {e}" for e in self.raw.errors]
        self.raw.errors.clear()

    def check_files(self, files: list[RawFile]) -> None:
        """Raw.check of each, four at a time (the reads are round trips, not work)."""
        with ThreadPoolExecutor(4) as pool:
            for problems in pool.map(lambda f: self.raw.check(f, self.tally), files):
                self.loss(problems)

    def loss(self, problems: list[str]) -> None:
        self.tally.losses += problems
        self.problems += problems

    def scrub_to_the_end(self) -> None:
        with self.tally.timed("scrubs run to the end"):
            self._scrub_to_the_end()

    def _scrub_to_the_end(self) -> None:
        """`cairnd scrub` until done (rebuilding blank disks): no block that an uploaded
        node needs may come out unrecoverable, and every disk is ok afterwards."""
        result = run_cairnd_in_process("scrub", "--home", self.config.home, "--json",
                                       timeout=300)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            self.problems.append(f"scrub: {result.returncode} {result.stderr[-2000:]}")
            return
        needed = self.needed_blocks()
        lost = set(report.get("unrecoverable_ids", [])) & needed
        if lost:
            self.loss([f"scrub: blocks of uploaded files unrecoverable: {sorted(lost)}"])
        disks = run_cairnd_in_process("disks", "--home", self.config.home, "--json")
        states = {d["name"]: d["state"] for d in json.loads(disks.stdout)}
        if set(states.values()) != {"ok"}:
            self.problems.append(f"disks after a scrub: {states}")

    def needed_blocks(self) -> set[str]:
        return {str(row[0]) for row in database_rows(self.config, UPLOADED_BLOCKS)}

    # -- sync folders --

    def new_path(self, rng: random.Random) -> str:
        self.serial += 1
        folder = rng.choice(SYNC_DIRS)
        return f"{folder}/f{self.serial}.bin".lstrip("/")

    def write(self, device: Device, path: str, data: bytes) -> None:
        target = device.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self.expected[path] = data

    def mutate(self, device: Device, rng: random.Random) -> list[str]:
        """New files, edits, a delete or a move in DEVICE's folder; the paths written."""
        written = []
        for _ in range(rng.randint(1, 5)):
            roll = rng.random()
            size = (rng.randint(1, 40_000) if roll < 0.7 else
                    rng.randint(50_000, 1_500_000) if roll < 0.96 else
                    rng.randint(4_200_000, 6_000_000))
            path = self.new_path(rng) if rng.random() < 0.7 or not self.expected \
                else rng.choice(sorted(self.expected))
            self.write(device, path, rng.randbytes(size))
            written.append(path)
        others = sorted(set(self.expected) - set(written))
        if rng.random() < 0.3 and len(others) > 30:
            gone = rng.choice(others)
            (device.folder / gone).unlink()
            del self.expected[gone]
        elif rng.random() < 0.25 and others:
            moved, path = rng.choice(others), self.new_path(rng)
            (device.folder / path).parent.mkdir(parents=True, exist_ok=True)
            os.rename(device.folder / moved, device.folder / path)
            self.expected[path] = self.expected.pop(moved)
            written.append(path)
        return written

    def converge(self, contested: dict[str, set[bytes]], what: str) -> None:
        laptop, desktop = self.devices

        def done() -> bool:
            return converged(laptop, desktop) and not sync_problems(
                tree_of(laptop.folder), self.expected, contested)
        try:
            with self.tally.timed("sync converging"):
                wait_for(done, CONVERGE_S, "the sync folders", every=0.25)
        except AssertionError:
            trees = [tree_of(d.folder) for d in self.devices]
            self.loss([f"sync ({what}) did not converge in {CONVERGE_S} s: "
                       f"{sync_problems(trees[0], self.expected, contested)} / "
                       f"{sync_problems(trees[1], self.expected, contested)}"])
            self.problems += [f"{d.name}'s log: {d.log_text()[-3000:]}" for d in self.devices]
            return
        tree = tree_of(laptop.folder)
        for path in contested:   # what was kept, under which names, is now plain files
            for name, data in tree.items():
                if data is not None and (name == path or name.startswith(copy_of(path))):
                    self.expected[name] = data

    def sync_round(self, rng: random.Random, kill_agent: bool) -> None:
        self.start_agents()
        writer, other = rng.sample(self.devices, 2)
        written = self.mutate(writer, rng)
        contested: dict[str, set[bytes]] = {}
        if kill_agent and rng.random() < 0.2:
            path = rng.choice(sorted(set(self.expected) - set(written)))
            mine, theirs = rng.randbytes(3000), rng.randbytes(3001)
            (writer.folder / path).write_bytes(mine)
            (other.folder / path).write_bytes(theirs)
            del self.expected[path]
            contested[path] = {mine, theirs}
        time.sleep(rng.uniform(0, 1.0))
        if kill_agent:
            victim = rng.choice(self.devices)
            code = victim.stop(signal.SIGKILL)
            if code != -signal.SIGKILL:
                self.problems.append(f"{victim.name}'s agent had ended with {code}")
            self.tally.kills["cairn sync"] += 1
            self.fsck("serving")
            self.start(victim)
        else:
            self.crash()
        self.converge(contested, "agent killed" if kill_agent else "appliance killed")
        self.stop_agents()
        self.tally.uploads_checked += len(written) + len(contested)

    # -- cairn put / get --

    def put_process(self, rng: random.Random) -> tuple[Path, str, bytes, subprocess.Popen[str]]:
        self.serial += 1
        data = rng.randbytes(rng.randint(200_000, 1_500_000) if rng.random() < 0.7
                             else rng.randint(4_200_000, 6_000_000))     # 1 or 2 blocks
        local = self.base / "put-src" / f"p{self.serial}.bin"
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(data)
        remote = f"/put/p{self.serial}.bin"
        process = subprocess.Popen([*CAIRN, "--home", str(self.porter), "put", str(local),
                                    remote], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=agent_env())
        return local, remote, data, process

    def finish_put(self, local: Path, remote: str, data: bytes, acknowledged: bool) -> None:
        """An unacknowledged put is run again (it resumes); then `cairn get` must give
        back the bytes."""
        if not acknowledged:
            result = run_cairn(self.porter, "put", local, remote)
            if result.returncode != 0:
                self.problems.append(f"put {remote} again: {result.stderr[-1000:]}")
                return
        self.puts[remote] = data
        self.check_get(remote)

    def check_get(self, remote: str) -> None:
        target = self.base / "got" / remote.rsplit("/", 1)[1]
        target.parent.mkdir(exist_ok=True)
        target.unlink(missing_ok=True)
        result = run_cairn(self.porter, "get", remote, target)
        if result.returncode != 0 or target.read_bytes() != self.puts[remote]:
            self.loss([f"get {remote}: exit {result.returncode} {result.stderr[-500:]}"])
            return
        self.tally.uploads_checked += 1
        self.tally.blocks_checked += -(-len(self.puts[remote]) // (4 * 1024 * 1024))

    def wait_or_kill(self, process: subprocess.Popen[str], delay: float, what: str) -> bool:
        """Whether PROCESS exited 0 within DELAY; else it is killed (SIGKILL) then."""
        try:
            process.wait(delay)
        except subprocess.TimeoutExpired:
            process.kill()
            self.tally.kills[what] += 1
        _, stderr = process.communicate(timeout=30)
        if process.returncode not in (0, -signal.SIGKILL) or "Traceback" in stderr:
            self.problems.append(f"{what} ended {process.returncode}: {stderr[-1000:]}")
        return process.returncode == 0

    # -- the scenarios --

    def run_round(self, number: int, scenario: str) -> None:
        rng = random.Random(f"{self.seed}-{number}")
        self.tally.rounds[scenario] += 1
        started = time.monotonic()
        getattr(self, "round_" + scenario.replace(",", "").replace(" ", "_"))(rng)
        self.tally.seconds[scenario] = self.tally.seconds.get(scenario, 0.0) + (
            time.monotonic() - started)

    def prune(self) -> None:
        """Delete the oldest raw files beyond RAW_FILES (acknowledged deletes): garbage for
        GC to take during the round, and a store that stays small enough for a quick
        fsck every round."""
        for file in list(self.raw.live())[:-RAW_FILES or None]:
            if self.raw.take(lambda free, f=file: f if f in free else None):  # type: ignore[misc]
                self.raw.delete(file)
                self.raw.release(file)

    def raw_crash(self, rng: random.Random, work: Callable[..., None], threads: int,
                  delay: tuple[float, float], *args: Any) -> None:
        self.prune()
        workers = self.workers(work, rng, threads, *args)
        time.sleep(rng.uniform(*delay))
        self.crash(workers)
        self.check_raw(rng)

    def round_block_upload(self, rng: random.Random) -> None:
        self.raw_crash(rng, upload_work, 3, (0.05, 0.6))

    def round_node_commit(self, rng: random.Random) -> None:
        self.raw_crash(rng, commit_work, 3, (0.05, 0.6))

    def round_batch_create(self, rng: random.Random) -> None:
        self.raw_crash(rng, batch_work, 2, (0.05, 0.6))

    def round_gc(self, rng: random.Random) -> None:
        """Files made and deleted now become garbage GRACE_S later; the kill comes while
        GC takes them, and while new files reuse their blocks."""
        doomed = [self.raw.new_file(new_node_id(), rng.choice(self.parents))
                  for _ in range(rng.randint(6, 16))]
        shared = self.raw.known_blocks()
        for file in doomed:
            blocks = blocks_of(rng, rng.randint(1, 3), 0.4) + rng.sample(
                shared, min(len(shared), rng.randint(0, 2)))
            send(self.raw, file, self.raw.create(file, rng.randbytes(20), blocks))
        pool = [b for file in doomed for b in file.current.blocks]
        for file in doomed:
            self.raw.delete(file)
            self.raw.release(file)
        time.sleep(GRACE_S - 0.3)
        self.raw_crash(rng, commit_work, 2, (0.0, 1.0), pool)

    def scrub_process(self) -> subprocess.Popen[str]:
        return subprocess.Popen([*CAIRND, "scrub", "--home", str(self.config.home)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=cairnd_env())

    def round_scrub(self, rng: random.Random) -> None:
        scrub = self.scrub_process()
        workers = self.workers(commit_work, rng, 1)
        time.sleep(rng.uniform(0.1, 1.5))
        self.crash(workers, [scrub])
        self.check_raw(rng)

    def round_rebuild(self, rng: random.Random) -> None:
        disk = rng.choice(self.config.store.disks)
        pulled = disk.path.with_name(disk.path.name + ".pulled")
        os.rename(disk.path, pulled)     # the disk pulled out (at once, as the kernel sees
        time.sleep(0.1)                  # it), and a moment later an empty one put in
        disk.path.mkdir()
        shutil.rmtree(pulled)
        scrub = self.scrub_process()
        workers = self.workers(commit_work, rng, 1)
        time.sleep(rng.uniform(0.1, 1.5))
        self.crash(workers, [scrub])
        self.check_raw(rng)
        self.scrub_to_the_end()
        self.check_raw(rng, sample=10)

    def round_repair(self, rng: random.Random) -> None:
        """One shard of some uploaded files' big blocks deleted, the files read (degraded:
        queued for repair); killed, and killed again while the restarted appliance works
        the queue."""
        disk = rng.choice(self.config.store.disks).name
        files = [f for f in self.raw.live() if f.current.complete
                 and any(len(b) > SMALL[1] for b in f.current.blocks)]
        victims = rng.sample(files, min(len(files), 8))
        for file in victims:
            for data in file.current.blocks:
                for shard in shard_files(self.config.store.disks, block_id(data)):
                    if shard.disk == disk and not shard.location.packed:
                        shard.location.delete()
            self.loss(self.raw.check(file, self.tally))
        time.sleep(rng.uniform(0, 0.3))
        self.crash()
        time.sleep(rng.uniform(0, 1.0))
        self.crash()
        for file in victims:
            self.loss(self.raw.check(file, self.tally))
        self.scrub_to_the_end()

    def round_sync_agent_killed(self, rng: random.Random) -> None:
        self.sync_round(rng, kill_agent=True)

    def round_sync_appliance_killed(self, rng: random.Random) -> None:
        self.sync_round(rng, kill_agent=False)

    def round_put_killed(self, rng: random.Random) -> None:
        local, remote, data, process = self.put_process(rng)
        acknowledged = self.wait_or_kill(process, rng.uniform(0.2, 1.0), "cairn put")
        self.fsck("serving")
        self.finish_put(local, remote, data, acknowledged)

    def round_get_killed(self, rng: random.Random) -> None:
        if not self.puts:
            self.round_put_killed(rng)
            return
        remote = rng.choice(sorted(self.puts))
        target = self.base / "get" / f"g{self.serial}.bin"
        self.serial += 1
        target.parent.mkdir(exist_ok=True)
        process = subprocess.Popen([*CAIRN, "--home", str(self.porter), "get", remote,
                                    str(target)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=agent_env())
        self.wait_or_kill(process, rng.uniform(0.2, 0.9), "cairn get")
        if target.exists() and target.read_bytes() != self.puts[remote]:
            self.loss([f"a killed get left {target.name} with other bytes"])
        self.fsck("serving")
        self.check_get(remote)

    def round_put_appliance_killed(self, rng: random.Random) -> None:
        local, remote, data, process = self.put_process(rng)
        time.sleep(rng.uniform(0.2, 1.0))
        self.crash()
        acknowledged = self.wait_or_kill(process, 60, "cairn put")
        self.finish_put(local, remote, data, acknowledged)

    # -- the end --

    def final_checks(self, rng: random.Random) -> None:
        with self.tally.timed("reading back"):
            self.check_files(list(self.raw.files.values()))
        for remote in sorted(self.puts):
            self.check_get(remote)
        self.start_agents()
        self.converge({}, "the end")
        self.stop_agents()
        self.scrub_to_the_end()
        self.fsck("serving")
        for device in self.devices:
            if part_files(device.folder):
                self.problems.append(f"{device.name}: partial files left: "
                                     f"{part_files(device.folder)}")
        self.appliance.stop()
        self.fsck("offline")
        print(f"garbage collection deleted {self.appliance.gc_deleted} blocks meanwhile "
              f"(the appliance's logs, {self.appliance.starts} runs)")
        self.problems += [f"the appliance logged: {t}" for t in self.appliance.tracebacks]


@pytest.mark.slow
@pytest.mark.timeout(300 + 10 * ROUNDS)
def test_kill_9_at_random_instants_loses_nothing_acknowledged(tmp_path: Path) -> None:
    print(f"\ncrash campaign: seed {SEED} (CAIRN_CRASH_SEED={SEED} replays), {ROUNDS} rounds")
    rng = random.Random(SEED)
    campaign = Campaign(tmp_path, SEED)
    started = time.monotonic()
    try:
        campaign.seed_sync(rng)
        for number, scenario in enumerate(schedule(rng, ROUNDS), start=1):
            campaign.run_round(number, scenario)
            if campaign.problems or campaign.appliance.tracebacks:
                problems = campaign.problems + campaign.appliance.tracebacks
                pytest.fail(f"round {number} ({scenario}): {campaign.tally.report()}; the "
                            f"homes and logs: {tmp_path}\n" + "\n".join(problems)[:20000])
        campaign.final_checks(rng)
    finally:
        campaign.close()
        print(campaign.tally.report() + f"; {time.monotonic() - started:.0f} s")
    assert not campaign.problems, "\n".join(campaign.problems)[:20000]
    assert not campaign.tally.losses
    assert sum(campaign.tally.rounds.values()) == ROUNDS
    assert campaign.tally.kills and campaign.tally.uploads_checked


@pytest.mark.slow
def test_an_agent_killed_between_a_files_node_and_its_blocks_finishes_the_upload(
        tmp_path: Path, fresh_user: MakeUser) -> None:
    """Pinned from the campaign (seed 297107055, round 254): `cairn sync` killed after the
    appliance made a big file's node and before its block arrived, once restarted, took the
    unfinished node for its own file already synced (the planner adopted a remote file of
    the same content without asking whether it was complete): `uploading` for good, and on
    no other device."""
    alice = fresh_user("alice")
    laptop, desktop = devices_of(alice, tmp_path, "laptop", "desktop")

    def unfinished() -> list[str]:
        return [str(row[0]) for row in database_rows(
            alice.appliance.config, "SELECT id FROM nodes WHERE status = 'uploading' AND "
            "owner_id = (SELECT id FROM users WHERE name = ?)", alice.name)]
    try:
        laptop.start()
        desktop.start()
        for attempt in range(5):     # until the kill lands before the block is stored
            data = os.urandom(1_400_000)
            write(desktop.folder / f"big{attempt}.bin", data)
            wait_for(unfinished, 30, "the file's node", every=0.002)
            assert desktop.stop(signal.SIGKILL) == -signal.SIGKILL
            if unfinished():
                break
            desktop.start()
        assert unfinished(), "every kill came after the upload"
        desktop.start()
        tree = wait_converged(laptop, desktop, timeout=60)
        assert tree[f"big{attempt}.bin"] == data
        assert not unfinished()
    finally:
        stop_all(laptop, desktop)

def test_a_folder_short_of_what_was_written_is_told() -> None:
    """The sync check itself (pure): what it calls lost, changed, invented, and the
    conflicted copies it accepts only for a file written on both devices."""
    expected = {"a.txt": b"a", "d/b.bin": b"b"}
    assert sync_problems({"a.txt": b"a", "d": None, "d/b.bin": b"b"}, expected, {}) == []
    assert sync_problems({"a.txt": b"a"}, expected, {}) == ["d/b.bin: missing (1 bytes lost)"]
    assert sync_problems({"a.txt": b"A", "d/b.bin": b"b"}, expected, {}) == [
        "a.txt: other bytes (1 instead of 1)"]
    copy = "d/b (conflicted copy from desktop 2026-01-01 10-00-00).bin"
    assert sync_problems({"a.txt": b"a", "d/b.bin": b"b", copy: b"x"}, expected, {}) == [
        f"{copy}: not written by anyone"]
    both = {"d/b.bin": {b"mine", b"theirs"}}
    assert sync_problems({"a.txt": b"a", "d/b.bin": b"theirs", copy: b"mine"},
                         expected, both) == []
    assert sync_problems({"a.txt": b"a", "d/b.bin": b"theirs"}, expected, both) == [
        "d/b.bin: written on both devices; 1 of 2 versions lost (['d/b.bin'])"]
