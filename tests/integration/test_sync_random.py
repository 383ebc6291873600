"""A randomized convergence test for `cairn sync`, in the spirit of Dropbox's CanopyCheck and
Trinity: three devices of one user, each running `cairn sync DIR` against a real appliance
on 127.0.0.1, and a random program of file-system operations applied to random devices'
folders — names from a tiny alphabet so that they collide often, short pauses between the
operations so that some changes race and others propagate, devices going offline (stopped,
or killed) and coming back, now and then a wait for the running devices to agree. At the
end every device runs, the folders must converge, and nothing anyone wrote may be lost.

The invariant, checked after convergence:

1. every folder is identical (files, their bytes, empty folders);
2. no version is lost. Every write is a new, unique content ("laptop-7-3fa2…"). Each
   content the test put into a folder (a write, an append, an atomic save) must be in the
   converged tree under some name (a conflicted copy counts) unless the test itself later
   destroyed a copy of exactly that content, on any device: rewrote, appended to or saved
   over a file holding it, deleted it, or deleted a folder holding it. The test knows
   exactly what it destroyed, however the agents raced with it: a rewrite reads the old
   content through the descriptor it then truncates (agents never write a file in place,
   they rename finished files into place), and a deletion, a save or a replacing move
   first renames the victim atomically (renameat2 NOREPLACE / EXCHANGE) into a trash
   folder outside DIR and reads it there. A move destroys nothing. So a content another
   device edited, deleted or moved while it did not know that content (the edit beats the
   delete; concurrent edits keep a conflicted copy; two creations of one name keep both)
   stays owed. One loss is excused and listed: a rewrite that landed in a file a download
   replaced in the same instant (its inode already unlinked when the write returned: the
   gap between the agent's last check and its rename, which no agent can close);
3. nothing is invented: every file in the converged tree holds a content the test wrote
   (or is empty — the instant between truncating and rewriting in place);
4. no `.cairn-part` file is left, every agent is still running and logged no traceback,
   and nothing beside the synced folders changed (sentinel files next to them, the trash).

The agents run with --allow-mass-delete: the random operations may delete most files at
once or empty a folder, which would otherwise (rightly) pause the agent.

Examples: CI runs a few fixed ones (hypothesis draws the seeds, derandomized), each seed
expanding into a program: a few files synced everywhere, then 15-25 random steps.
CAIRN_RANDOM_SYNC_EXAMPLES=200 runs that many fresh seeds instead (a bug hunt);
CAIRN_RANDOM_SYNC_SEED=N replays one program: the same operations and pauses (the
interleaving with the agents is up to the scheduler, so a race may need a few tries). A
failure prints the seed, every step and what it did, what is missing or invented, the
converged tree and the agents' logs; with --basetemp=DIR the agents' homes (sync.log,
sync.db) stay there for a post-mortem.

Engine bugs the random runs found are pinned below as small deterministic tests (while
a bug is open, its test is marked xfail (strict) with the bug).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_helpers import make_user, write
from cairnd_helpers import Served
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from sync_helpers import (
    PART,
    Device,
    devices_of,
    part_files,
    stop_all,
    tree_of,
    wait_converged,
    wait_for,
)

pytestmark = pytest.mark.slow   # random programs and pinned ones: tens of seconds each
EXAMPLES = int(os.environ.get("CAIRN_RANDOM_SYNC_EXAMPLES", "4"))
REPLAY = os.environ.get("CAIRN_RANDOM_SYNC_SEED")
HUNTING = "CAIRN_RANDOM_SYNC_EXAMPLES" in os.environ      # fresh seeds on every run
STEPS = (15, 25)
DEVICES = ("laptop", "desktop", "tablet")
FILE_PATHS = ("a.txt", "b.txt", "c.txt", "d1/a.txt", "d1/b.txt", "d2/a.txt", "d1/d3/c.txt")
DIR_PATHS = ("d1", "d2", "d3", "d1/d3")
BIG = 60_000            # above the agent's small-file batching (48 KiB): the other path
SETTLE_S = 60
CONVERGE_S = 90


# --- the program --------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """Create or overwrite PATH (making its folders): in place, or saved atomically."""
    device: int
    path: str
    atomic: bool
    big: bool


@dataclass(frozen=True)
class Edit:
    """Change an existing file (the PICK-th, modulo, in sorted order: conflicted copies and
    files other devices made are fair game): overwrite, append or save atomically."""
    device: int
    pick: int
    how: str


@dataclass(frozen=True)
class Delete:
    device: int
    pick: int


@dataclass(frozen=True)
class Move:
    """Move a file to TO (into an existing or a new folder); over an existing file too if
    REPLACE, else a taken name skips the step."""
    device: int
    pick: int
    to: str
    replace: bool


@dataclass(frozen=True)
class MakeDir:
    device: int
    path: str


@dataclass(frozen=True)
class DeleteDir:
    device: int
    pick: int


@dataclass(frozen=True)
class MoveDir:
    """Rename a folder to TO, or move it into TO when that folder exists."""
    device: int
    pick: int
    to: str


@dataclass(frozen=True)
class Offline:
    device: int
    crash: bool     # SIGKILL instead of SIGTERM


@dataclass(frozen=True)
class Online:
    device: int


@dataclass(frozen=True)
class Settle:
    """Wait for the running devices to agree."""


Op = Write | Edit | Delete | Move | MakeDir | DeleteDir | MoveDir | Offline | Online | Settle


@dataclass(frozen=True)
class Step:
    op: Op
    pause: float    # seconds to wait after it


def random_op(rng: random.Random) -> Op:
    device, pick = rng.randrange(len(DEVICES)), rng.randrange(1000)
    kind = rng.choices(["write", "edit", "delete", "move", "mkdir", "rmdir", "mvdir",
                        "offline", "online", "settle"],
                       weights=[22, 18, 9, 10, 3, 5, 6, 7, 9, 5])[0]
    if kind == "write":
        return Write(device, rng.choice(FILE_PATHS), rng.random() < 0.3, rng.random() < 0.1)
    if kind == "edit":
        return Edit(device, pick, rng.choice(["overwrite", "append", "save"]))
    if kind == "delete":
        return Delete(device, pick)
    if kind == "move":
        return Move(device, pick, rng.choice(FILE_PATHS), rng.random() < 0.4)
    if kind == "mkdir":
        return MakeDir(device, rng.choice(DIR_PATHS))
    if kind == "rmdir":
        return DeleteDir(device, pick)
    if kind == "mvdir":
        return MoveDir(device, pick, rng.choice(DIR_PATHS))
    if kind == "offline":
        return Offline(device, rng.random() < 0.3)
    if kind == "online":
        return Online(device)
    return Settle()


def random_program(seed: int) -> list[Step]:
    """A few files written and synced everywhere (so that later steps race against a
    common base, where conflicts are decided), then 15-25 random steps."""
    rng = random.Random(seed)
    start = [Step(Write(rng.randrange(len(DEVICES)), path, False, False), 0.0)
             for path in rng.sample(FILE_PATHS, rng.randint(2, 4))]
    return start + [Step(Settle(), 0.0)] + [
        Step(random_op(rng), 0.0 if rng.random() < 0.3 else round(rng.uniform(0, 0.5), 2))
        for _ in range(rng.randint(*STEPS))]


# --- atomic renames (renameat2) -----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def rename(source: Path, target: Path, flags: int) -> None:
    """rename(2) that never silently replaces (NOREPLACE) or swaps both names (EXCHANGE),
    so the test knows exactly what left the folder."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target),
                       flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), str(source), None, str(target))


def read_fd(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def write_fd(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def listing(folder: Path) -> tuple[list[str], list[str]]:
    """(files, folders) under FOLDER, sorted, relative, without Cairn's temporaries."""
    tree = tree_of(folder)
    return (sorted(p for p, data in tree.items() if data is not None),
            sorted(p for p, data in tree.items() if data is None))


def is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + "/")


def short(content: bytes) -> str:
    text = content[:40].decode(errors="replace").replace("\n", "⏎")
    return repr(text) + (f"…({len(content)} bytes)" if len(content) > 40 else "")


def disagreement(devices: list[Device]) -> str:
    """The paths where DEVICES differ, with what each holds there."""
    trees = {d.name: tree_of(d.folder) for d in devices}
    lines = []
    for path in sorted(set().union(*trees.values())):
        held = {name: ("absent" if path not in tree else "/" if tree[path] is None
                       else short(tree[path] or b"")) for name, tree in trees.items()}
        if len(set(held.values())) > 1:
            lines.append(f"  {path}: " + "; ".join(f"{n} {h}" for n, h in held.items()))
    return "where they differ:\n" + "\n".join(lines)


# --- running a program --------------------------------------------------------------------

@dataclass
class Ledger:
    """Every content written, and which of them the user destroyed (see the docstring)."""
    written: dict[bytes, str] = field(default_factory=dict)     # content -> "#3 laptop …"
    released: dict[bytes, str] = field(default_factory=dict)    # content -> why
    excused: dict[bytes, str] = field(default_factory=dict)     # content -> why

    def owed(self) -> dict[bytes, str]:
        return {c: where for c, where in self.written.items()
                if c not in self.released and c not in self.excused}


class Skip(Exception):
    """The step does not apply to the folder as it is now (a no-op)."""


class Runner:
    def __init__(self, devices: list[Device], trash: Path, seed: int, replay: str) -> None:
        self.devices = devices
        self.replay = replay
        self.trash = trash
        self.rng = random.Random(seed ^ 0x5EED)
        self.ledger = Ledger()
        self.history: list[str] = []
        self.trash_tree: dict[str, bytes | None] = {}
        self._names = itertools.count()
        self.step = 0

    def run(self, program: list[Step]) -> None:
        for index, step in enumerate(program):
            self.step = index
            try:
                done = self.apply(step.op)
            except Skip as why:
                done = f"skipped: {why}"
            except OSError as exc:   # a race with an agent: the item moved or vanished
                done = f"skipped: {exc.strerror} ({exc.filename})"
            who = DEVICES[step.op.device] if hasattr(step.op, "device") else "all"
            self.history.append(f"#{index} {who}: {step.op} +{step.pause}s -> {done}")
            self.trash_tree = tree_of(self.trash)
            time.sleep(step.pause)

    def apply(self, op: Op) -> str:
        if isinstance(op, Write):
            return self.write(op)
        if isinstance(op, Edit):
            return self.edit(op)
        if isinstance(op, Delete | DeleteDir):
            return self.delete(op)
        if isinstance(op, Move):
            return self.move(op)
        if isinstance(op, MakeDir):
            os.makedirs(self.devices[op.device].folder / op.path, exist_ok=True)
            return "made"
        if isinstance(op, MoveDir):
            return self.move_dir(op)
        if isinstance(op, Offline | Online):
            return self.switch(op)
        return self.settle()

    # content and the ledger

    def content(self, device: Device, big: bool = False) -> bytes:
        token = self.rng.randbytes(4).hex()
        line = f"{device.name}-{self.step}-{token}\n".encode()
        return line + (token.encode() * (BIG // len(token)) if big else b"")

    def wrote(self, content: bytes, device: Device, path: str, unlinked: bool) -> str:
        where = f"#{self.step} {device.name} {path}"
        self.ledger.written[content] = where
        if unlinked:
            self.ledger.excused[content] = where + ": a download replaced it as it was written"
            return f"wrote {short(content)} (EXCUSED: replaced by a download meanwhile)"
        return f"wrote {short(content)}"

    def release(self, content: bytes, why: str) -> None:
        if content:
            self.ledger.released.setdefault(content, f"#{self.step} {why}")

    def release_tree(self, path: Path, why: str) -> str:
        """Release everything at PATH (in the trash): what the user just removed."""
        if path.is_dir():
            contents = [c for c in tree_of(path).values() if c is not None]
        else:
            contents = [path.read_bytes()]
        for content in contents:
            self.release(content, why)
        return ", ".join(short(c) for c in contents) or "nothing"

    def trash_path(self, what: str) -> Path:
        return self.trash / f"{self.step:03}-{next(self._names)}-{what}"

    def pick(self, device: Device, pick: int, folders: bool = False) -> str:
        files, dirs = listing(device.folder)
        choices = dirs if folders else files
        if not choices:
            raise Skip("nothing to pick")
        return choices[pick % len(choices)]

    # the operations

    def write(self, op: Write) -> str:
        device = self.devices[op.device]
        target = device.folder / op.path
        os.makedirs(target.parent, exist_ok=True)
        data = self.content(device, op.big)
        if op.atomic:
            return self.save(device, op.path, data)
        return self.rewrite(device, op.path, data, create=True, append=False)

    def edit(self, op: Edit) -> str:
        device = self.devices[op.device]
        path = self.pick(device, op.pick)
        data = self.content(device)
        if op.how == "save":
            return f"{path}: " + self.save(device, path, data)
        return f"{path}: " + self.rewrite(device, path, data, create=False,
                                          append=op.how == "append")

    def rewrite(self, device: Device, path: str, data: bytes, *, create: bool,
                append: bool) -> str:
        """Write in place through one descriptor: what it held before is exactly what
        this write destroyed."""
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        fd = os.open(device.folder / path, flags, 0o644)
        try:
            before = read_fd(fd)
            if append:
                write_fd(fd, data, len(before))
                data = before + data
            else:
                os.ftruncate(fd, 0)
                write_fd(fd, data, 0)
            unlinked = os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        self.release(before, f"{device.name} {'appended to' if append else 'rewrote'} {path}")
        return self.wrote(data, device, path, unlinked) + (
            f" over {short(before)}" if before else "")

    def save(self, device: Device, path: str, data: bytes) -> str:
        """Save as editors do: a new file renamed over the old one. The old one is swapped
        into the trash (RENAME_EXCHANGE), never silently replaced."""
        temporary = self.trash_path("save")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_fd(fd, data, 0)
            try:
                rename(temporary, device.folder / path, RENAME_NOREPLACE)
                replaced = None
            except FileExistsError:
                rename(temporary, device.folder / path, RENAME_EXCHANGE)
                replaced = temporary
            unlinked = os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        done = self.wrote(data, device, path, unlinked) + " (atomic save)"
        if replaced is not None:
            done += " over " + self.release_tree(replaced, f"{device.name} saved over {path}")
        return done

    def delete(self, op: Delete | DeleteDir) -> str:
        device = self.devices[op.device]
        path = self.pick(device, op.pick, folders=isinstance(op, DeleteDir))
        removed = self.trash_path("deleted")
        rename(device.folder / path, removed, RENAME_NOREPLACE)
        return f"deleted {path}: " + self.release_tree(removed,
                                                      f"{device.name} deleted {path}")

    def move(self, op: Move) -> str:
        device = self.devices[op.device]
        path = self.pick(device, op.pick)
        source, target = device.folder / path, device.folder / op.to
        if path == op.to:
            raise Skip(f"{path} is already there")
        os.makedirs(target.parent, exist_ok=True)
        if not (op.replace and target.is_file()):
            rename(source, target, RENAME_NOREPLACE)
            return f"moved {path} to {op.to}"
        # `mv` over an existing file: swap the two, then the old one goes to the trash
        rename(source, target, RENAME_EXCHANGE)
        removed = self.trash_path("replaced")
        try:
            rename(source, removed, RENAME_NOREPLACE)
        except OSError as exc:    # an agent moved it meanwhile: it stays (and stays owed)
            return f"swapped {path} and {op.to}; the old one was not deleted ({exc.strerror})"
        return f"moved {path} over {op.to}: " + self.release_tree(
            removed, f"{device.name} moved {path} over {op.to}")

    def move_dir(self, op: MoveDir) -> str:
        device = self.devices[op.device]
        path = self.pick(device, op.pick, folders=True)
        to = op.to
        if (device.folder / to).is_dir():
            to = f"{to}/{path.rsplit('/', 1)[-1]}"
        if is_within(to, path):
            raise Skip(f"{to} is inside {path}")
        os.makedirs((device.folder / to).parent, exist_ok=True)
        rename(device.folder / path, device.folder / to, RENAME_NOREPLACE)
        return f"moved {path}/ to {to}/"

    def switch(self, op: Offline | Online) -> str:
        device = self.devices[op.device]
        if isinstance(op, Online):
            if device.process is not None:
                raise Skip("already running")
            device.start()
            return "started"
        if device.process is None:
            raise Skip("already stopped")
        device.stop(signal.SIGKILL if op.crash else signal.SIGTERM)
        return "killed" if op.crash else "stopped"

    def settle(self) -> str:
        running = [d for d in self.devices if d.process is not None]
        if len(running) < 2:
            raise Skip("fewer than two devices running")
        started = time.monotonic()
        try:
            wait_converged(*running, timeout=SETTLE_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{disagreement(running)}") from None
        return (f"{', '.join(d.name for d in running)} agreed in "
                f"{time.monotonic() - started:.1f} s")


# --- fixtures and the test ----------------------------------------------------------------

def new_devices(base: Path, appliance: Served) -> list[Device]:
    """Three devices of a new user of the session's appliance (every example has its own)."""
    devices = devices_of(make_user(appliance, "random"), base, *DEVICES)
    for device in devices:
        device.extra = ("--allow-mass-delete",)    # random deletions may empty a folder
    return devices


def sentinels(base: Path, devices: list[Device]) -> dict[Path, bytes]:
    """Files right beside each synced folder (same prefix too): nothing may touch them."""
    placed = {}
    for device in devices:
        for path in (device.folder.with_name(device.folder.name + ".txt"),
                     device.folder.with_name(device.folder.name + "-2") / "a.txt"):
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(f"outside {path.name}".encode())
            placed[path] = path.read_bytes()
    (base / "trash").mkdir()
    return placed


def seeds() -> st.SearchStrategy[int]:
    if REPLAY is not None:
        return st.just(int(REPLAY))
    return st.integers(0, 2**32 - 1)


@pytest.mark.timeout(120 + 300 * (1 if REPLAY else EXAMPLES))
@settings(max_examples=1 if REPLAY else EXAMPLES, deadline=None, derandomize=not HUNTING,
          database=None, phases=(Phase.explicit, Phase.generate), print_blob=False)
@given(seed=seeds())
def test_random_operations_converge_and_lose_nothing(
        appliance: Served,
        tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    replay = f"CAIRN_RANDOM_SYNC_SEED={seed} pytest {__file__}"
    run_and_check(appliance, tmp_path_factory.mktemp(f"seed-{seed}"), seed,
                  random_program(seed), replay, CONVERGE_S)


# Programs the random test once failed on, pinned (a seed's timing may stop reaching the
# bug as the engine changes). Each was an engine bug, fixed since.
KNOWN_PROGRAMS = {
    # seed 1305: "both moved d1" became MoveLocal(d2 -> d2/d1), a folder into itself
    # (EINVAL on every round, never converged); fixed in 93b01fb
    "folder-moved-into-the-name-it-got-elsewhere": pytest.param([
        Step(Write(0, "d1/a.txt", False, False), 0.0),
        Step(Settle(), 0.0),
        Step(Offline(1, False), 0.0),
        Step(MakeDir(0, "d2"), 0.0),
        Step(MoveDir(0, 0, "d2"), 3.0),        # laptop: d1/ -> d2/d1/ (d2 exists there)
        Step(MoveDir(1, 0, "d2"), 0.0),        # desktop, offline: d1/ -> d2/
        Step(Online(1), 0.0)]),
    # seed 931: MoveRemote(d2 -> d1/d2) into a folder deleted on the appliance failed on
    # every round and, moves coming first, held up everything; fixed in b4107f3
    "folder-moved-into-a-folder-deleted-elsewhere": pytest.param([
        Step(Write(0, "d1/a.txt", False, False), 0.0),
        Step(Write(0, "d2/a.txt", False, False), 0.0),
        Step(Settle(), 0.0),
        Step(Offline(0, False), 0.0),
        Step(MoveDir(0, 1, "d1"), 0.0),        # laptop, offline: d2/ -> d1/d2/
        Step(Write(0, "c.txt", False, False), 0.0),     # ... and an unrelated new file
        Step(DeleteDir(1, 0), 3.0),            # desktop: deletes d1/
        Step(Online(0), 0.0)]),
    # seed 1: MoveLocal(a.txt -> d2/a.txt) found its destination taken by the laptop's
    # unsynced d2/a.txt and set it aside, which asked for d2's base entry; d2 was new on
    # both sides (adopted only after the move phase), so it failed on every round and the
    # laptop never synced again; fixed in 8c1b181
    "file-moved-onto-a-new-file-in-a-new-folder": pytest.param([
        Step(Write(0, "a.txt", False, False), 0.0),
        Step(Settle(), 0.0),
        Step(Offline(0, False), 0.0),
        Step(Write(0, "d2/a.txt", False, False), 0.0),  # laptop, offline: new d2/a.txt
        Step(Move(1, 0, "d2/a.txt", False), 3.0),      # desktop: a.txt -> d2/a.txt
        Step(Online(0), 0.0)]),
    # seed 337563: two devices moved a file to the same name, one of them also edited it;
    # the other recorded the edited version as synced with its old bytes ("both moved it
    # to the same place" adopted the appliance's version and content), so it kept the
    # old file for good (and would have based its next edit on it)
    "file-moved-to-one-name-on-two-devices-and-edited-on-one": pytest.param([
        Step(Write(0, "a.txt", False, False), 0.0),
        Step(Settle(), 0.0),
        Step(Offline(0, False), 0.0),
        Step(Move(1, 0, "b.txt", False), 0.3),         # desktop: a.txt -> b.txt
        Step(Edit(1, 0, "append"), 3.0),               # ... and appends to it
        Step(Move(0, 0, "b.txt", False), 0.0),         # laptop, offline: a.txt -> b.txt
        Step(Online(0), 0.0)]),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("program", KNOWN_PROGRAMS.values(), ids=KNOWN_PROGRAMS.keys())
def test_known_programs(appliance: Served,
                        tmp_path: Path, request: pytest.FixtureRequest,
                        program: list[Step]) -> None:
    replay = f"pytest {__file__} -k {request.node.callspec.id}"
    run_and_check(appliance, tmp_path, 0, program, replay, 20)


@pytest.mark.timeout(300)
def test_a_file_rewritten_while_it_uploads_still_syncs(
        appliance: Served, tmp_path: Path) -> None:
    """What seed 413 ran into, made deterministic: one device rewrites a 32 MiB file every
    half second, so that rewrites land in the middle of uploads, then stops. Its last
    version must reach the other device under its name, with no conflicted copy: nobody
    else wrote. (An upload stopped by a change used to leave its version 'uploading' for
    ever — every device waited for it — or, stopped after the last block, unrecorded, so
    the device kept its own upload aside as a conflicted copy; fixed in 93b01fb.)"""
    laptop, desktop, _ = new_devices(tmp_path, appliance)
    big = laptop.folder / "big.bin"
    big.write_bytes(os.urandom(32 << 20))
    try:
        laptop.start()
        desktop.start()
        wait_converged(laptop, desktop, timeout=120)
        for _ in range(8):
            fd = os.open(big, os.O_WRONLY)      # in place, every block new
            try:
                write_fd(fd, os.urandom(32 << 20), 0)
            finally:
                os.close(fd)
            time.sleep(0.5)
        last = big.read_bytes()
        tree = wait_converged(laptop, desktop, timeout=30)
        kept_last = tree.get("big.bin") == last
        assert kept_last, f"big.bin does not hold the last version; {sorted(tree)}"
        assert sorted(tree) == ["big.bin"]
    finally:
        stop_all(laptop, desktop)


def bytes_read(device: Device) -> int:
    """What the agent's process has read so far (/proc/PID/io rchar)."""
    assert device.process is not None
    io = Path(f"/proc/{device.process.pid}/io").read_text()
    return int(io.split("rchar:")[1].split()[0])


@pytest.mark.timeout(300)
def test_an_edit_inside_a_folder_deleted_elsewhere_meanwhile_survives(
        appliance: Served, tmp_path: Path) -> None:
    """What seed 1510 ran into, made deterministic: the laptop's plan deletes d/ last,
    after a long upload; the laptop is frozen (SIGSTOP) during that upload while the
    desktop sends its edit of d/c.txt, then thawed. The edit must survive. (The folder's
    deletion used to check only the folder's own version, so the edit went with it;
    fixed in 93b01fb.)"""
    laptop, desktop, _ = new_devices(tmp_path, appliance)
    try:
        for device in (laptop, desktop):
            device.start()
        write(laptop.folder / "d/c.txt", "original")
        wait_converged(laptop, desktop)
        stop_all(laptop, desktop)
        shutil.rmtree(laptop.folder / "d")                        # deleted on the laptop
        write(laptop.folder / "big.bin", os.urandom(128 << 20))   # ... and a long upload
        write(desktop.folder / "d/c.txt", "edited on the desktop")  # edited on the desktop
        laptop.start()
        wait_for(lambda: bytes_read(laptop) > 64 << 20, timeout=60,
                 what="the laptop to be uploading (its plan made)", every=0.01)
        assert laptop.process is not None
        laptop.process.send_signal(signal.SIGSTOP)
        try:
            desktop.start()
            wait_for(lambda: "uploaded d/c.txt" in desktop.log_text(), what="the edit")
        finally:
            laptop.process.send_signal(signal.SIGCONT)
        tree = wait_converged(laptop, desktop, timeout=60)
        kept = tree.get("d/c.txt")
        assert kept == b"edited on the desktop", sorted(tree)
    finally:
        stop_all(laptop, desktop)


def run_and_check(appliance: Served, base: Path, seed: int,
                  program: list[Step], replay: str, converge_s: float) -> None:
    """Run PROGRAM on three fresh devices of a fresh user in BASE, then check."""
    devices = new_devices(base, appliance)
    outside = sentinels(base, devices)
    expected_beside = set(os.listdir(base))
    runner = Runner(devices, base / "trash", seed, replay)
    started = time.monotonic()
    try:
        for device in devices:
            device.start()
        try:
            runner.run(program)
        except AssertionError as exc:      # a Settle step: the running devices disagree
            raise AssertionError(report(runner, str(exc), logs=False)) from None
        for device in devices:
            if device.process is None:
                device.start()
        tree = check(runner, devices, converge_s)
        assert tree_of(base / "trash") == runner.trash_tree, report(
            runner, "the trash (outside every folder) changed")
        assert set(os.listdir(base)) == expected_beside, report(
            runner, f"beside the folders: {sorted(set(os.listdir(base)))}")
        assert all(path.read_bytes() == data for path, data in outside.items())
        print("\n".join(runner.history))      # shown with -s
        print(f"seed {seed}: {len(program)} steps, {len(runner.ledger.written)} contents, "
              f"{len(tree)} items, {len(runner.ledger.excused)} excused, "
              f"{time.monotonic() - started:.1f} s")
    finally:
        stop_all(*devices)


def check(runner: Runner, devices: list[Device], converge_s: float
          ) -> dict[str, bytes | None]:
    """Invariants 1-4 of the docstring; the converged tree."""
    try:
        tree = wait_converged(*devices, timeout=converge_s)
    except AssertionError as exc:
        raise AssertionError(report(runner, f"{exc}\n{disagreement(devices)}",
                                    logs=False)) from None
    dead = [d.name for d in devices if not d.running()]
    assert not dead, report(runner, f"agents exited: {dead}")
    present = {data for data in tree.values() if data is not None}
    missing = {c: w for c, w in runner.ledger.owed().items() if c not in present}
    assert not missing, report(runner, "lost contents:\n" + "\n".join(
        f"  {short(c)} written at {w}" for c, w in missing.items()), tree)
    invented = {p: c for p, c in tree.items()
                if c is not None and c and c not in runner.ledger.written}
    assert not invented, report(runner, "contents nobody wrote:\n" + "\n".join(
        f"  {p}: {short(c)}" for p, c in invented.items()), tree)
    deadline = time.monotonic() + 10     # a restarted agent removes stale parts when idle
    while any(part_files(d.folder) for d in devices) and time.monotonic() < deadline:
        time.sleep(0.1)
    parts = [p for d in devices for p in part_files(d.folder)]
    assert not parts, report(runner, f"{PART} files left: {parts}", tree)
    crashed = [d.name for d in devices if "Traceback" in d.log_text()]
    assert not crashed, report(runner, f"tracebacks in the logs of {crashed}")
    return tree


def report(runner: Runner, problem: str, tree: dict[str, bytes | None] | None = None,
           logs: bool = True) -> str:
    """Everything needed to understand and replay a failure."""
    lines = [problem, "", f"replay: {runner.replay}",
             "steps:", *runner.history]
    if runner.ledger.excused:
        lines += ["excused:", *runner.ledger.excused.values()]
    if tree is not None:
        lines += ["converged tree:", *(f"  {p}: {'/' if c is None else short(c)}"
                                       for p, c in sorted(tree.items()))]
    if logs:
        for device in runner.devices:
            lines += [f"--- {device.name} ({device.log})", device.log_text()[-6000:]]
    text = "\n".join(lines)
    print(text)
    return text
