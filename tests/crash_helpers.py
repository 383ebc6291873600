"""Helpers for the crash campaign (tests/integration/test_crash_campaign.py): an appliance
that can be killed with SIGKILL and started again on the same address, the `cairnd fsck`
check (with a stand-in of SQL invariants for when the command is not there), the tally a
campaign prints, and a model of what a raw API client was told.

The raw model is the heart of "nothing acknowledged is lost". Every file the campaign's
API client (a device of a user the agents never see, with opaque metadata) writes is a
RawFile holding the states the appliance may have for it: the state the last answered
request left, and, after a request that got no answer (the server died under it), that
request's outcome too. Each state records which of its blocks were acknowledged (the
create or update named them as held, or a PUT / POST /blocks answered ok). After the
restart `check` reads the node back and collapses the candidates to the one found:
- no candidate with the node's version (or the node gone while no candidate is deleted
  or absent): an acknowledged write was lost;
- `uploaded`: every block is fetched and compared byte for byte;
- `uploading`: none of the blocks still asked for may be one acknowledged for this
  version, and a version whose blocks were all acknowledged must be `uploaded`.
A check then resumes an interrupted upload (sends what is asked for), as an agent would.
"""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import httpx
from api_helpers import Device, new_node_id, pinned_context
from cairnd_helpers import RunningAppliance, run_cairnd_in_process, serving

from appliance.config import ApplianceConfig

Json = dict[str, Any]
COPY = "conflicted copy from"


# --- the tally ------------------------------------------------------------------------------

@dataclass
class Tally:
    """What a campaign did, printed at its end (and when it fails)."""

    seed: int
    rounds: Counter[str] = field(default_factory=Counter)      # scenario -> rounds
    kills: Counter[str] = field(default_factory=Counter)       # process kind -> SIGKILLs
    fsck: Counter[str] = field(default_factory=Counter)        # "offline" / "serving"
    seconds: dict[str, float] = field(default_factory=dict)   # scenario -> time spent
    spent: dict[str, float] = field(default_factory=dict)     # phase of a round -> time
    uploads_checked: int = 0     # acknowledged uploads read back (a file, a put, a sync)
    blocks_checked: int = 0      # blocks of those compared byte for byte
    losses: list[str] = field(default_factory=list)

    def report(self) -> str:
        rounds = ", ".join(f"{name} {count} ({self.seconds.get(name, 0):.0f} s)"
                           for name, count in sorted(self.rounds.items()))
        kills = ", ".join(f"{name} {count}" for name, count in sorted(self.kills.items()))
        fsck = ", ".join(f"{name} {count}" for name, count in sorted(self.fsck.items()))
        return (f"crash campaign, seed {self.seed}: {sum(self.rounds.values())} rounds "
                f"({rounds}); kill -9: {sum(self.kills.values())} ({kills}); fsck runs: "
                f"{fsck}; acknowledged uploads checked: {self.uploads_checked}; blocks "
                f"checked: {self.blocks_checked}; losses: {len(self.losses)}; time in "
                + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.spent.items()))

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.spent[phase] = self.spent.get(phase, 0.0) + time.monotonic() - started


# --- an appliance to kill -------------------------------------------------------------------

GC_LINE = re.compile(r"garbage collection: \d+ deleted nodes purged, (\d+) blocks deleted")


class Appliance:
    """`cairnd serve` for one home on one fixed address (agents keep their URL across
    restarts), started again after each kill. Tracebacks any incarnation logged are kept
    in `tracebacks` (the campaign fails on them)."""

    def __init__(self, config: ApplianceConfig, listen: str) -> None:
        self.config = config
        self.listen = listen
        self._stack: ExitStack | None = None
        self._server: RunningAppliance | None = None
        self.tracebacks: list[str] = []
        self.starts = 0
        self.gc_deleted = 0      # blocks garbage collection deleted, by the logs

    @property
    def server(self) -> RunningAppliance:
        assert self._server is not None, "the appliance is not running"
        return self._server

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"https://{self.listen}"

    def start(self) -> None:
        assert self._stack is None, "already running"
        self._stack = ExitStack()
        self._server = self._stack.enter_context(
            serving(self.config.home, "--listen", self.listen))
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL, and the exit status must say it was that (not a crash of its own)."""
        code = self.server.stop(signal.SIGKILL)
        self._end(f"killed ({code})", code == -signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a clean stop exits 0."""
        code = self.server.stop()
        self._end(f"stopped ({code})", code == 0)

    def _end(self, how: str, as_expected: bool) -> None:
        log = self.server.stderr()
        self.gc_deleted += sum(int(m[1]) for m in GC_LINE.finditer(log))
        if "Traceback" in log:
            self.tracebacks.append(log[log.index("Traceback") - 300:][:4000])
        assert self._stack is not None
        self._stack.close()
        self._stack, self._server = None, None
        assert as_expected, f"the appliance {how}; its log:\n{log[-4000:]}"


# --- fsck -----------------------------------------------------------------------------------

def fsck_problems(config: ApplianceConfig) -> list[str]:
    """`cairnd fsck --home H --json`, in-process (beside the running appliance when it
    serves, on the disks directly when it does not): what it found wrong, [] when clean.
    Notices (orphan blocks a crash left, degraded blocks queued for repair, uploads a
    crash interrupted) are the normal traces of a crash and do not count; see
    appliance/fsck.py."""
    result = run_cairnd_in_process("fsck", "--home", config.home, "--json", timeout=300)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        return [f"fsck exit {result.returncode}, no JSON: {result.stdout[-2000:]}"
                f"{result.stderr[-2000:]}"]
    clean = report.get("clean") if isinstance(report, dict) else None
    if result.returncode == 0 and clean is not False and "Traceback" not in result.stderr:
        return []
    return [f"fsck exit {result.returncode}: {json.dumps(report)[:4000]} "
            f"{result.stderr[-2000:]}"]


# The blocks that uploaded live files need (every one must stay decodable).
UPLOADED_BLOCKS = """
    SELECT DISTINCT nb.block_id FROM node_blocks nb JOIN nodes n ON n.id = nb.node_id
    WHERE n.status = 'uploaded' AND n.deleted_at IS NULL"""


# --- the raw API client's model -------------------------------------------------------------

def block_id(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class RawState:
    """One state the appliance may hold for a file: VERSION (0: never created) with its
    metadata and blocks, or deleted; `acked`, the ids of its blocks acknowledged as held."""

    version: int
    metadata: bytes = b""
    blocks: tuple[bytes, ...] = ()
    deleted: bool = False
    acked: set[str] = field(default_factory=set)

    @property
    def ids(self) -> list[str]:
        return [block_id(b) for b in self.blocks]

    @property
    def complete(self) -> bool:
        """Every block acknowledged: the version must read back whole."""
        return not self.deleted and self.version > 0 and set(self.ids) <= self.acked


ABSENT = RawState(0)


@dataclass
class RawFile:
    node_id: str
    parent: str
    states: list[RawState]     # [what the last answer left] + outcomes of unanswered requests

    @property
    def current(self) -> RawState:
        return self.states[0]


class Dead(Exception):
    """The appliance did not answer (it was killed): the worker stops."""


class Raw:
    """The campaign's API client (one enrolled device, opaque metadata) and its model.
    Thread-safe: workers take files with `take` (no two requests on one file at once),
    and checks of different files may run at once."""

    def __init__(self, device: Device, certificate: Path, url: str) -> None:
        self.device = device
        self.certificate = certificate
        self.url = url
        self.lock = threading.Lock()
        self.files: dict[str, RawFile] = {}
        self.busy: set[str] = set()
        self.touched: set[str] = set()         # changed since the last check
        self.folders: list[str] = []
        self.errors: list[str] = []            # answers no request should get

    # -- the connection --

    def renew(self) -> None:
        """A new connection pool after a restart (the old connections are dead)."""
        self.device.close()
        self.device = Device(httpx.Client(
            base_url=self.url, verify=pinned_context(self.certificate), timeout=30,
            headers={"Authorization": f"Bearer {self.device.token}"}),
            self.device.device_id, self.device.user, self.device.token)

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        """One request; Dead when the appliance is gone, an error recorded (and Dead, to
        stop the worker) for any answer but EXPECT."""
        try:
            response = self.device.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Dead(str(exc)) from None
        if response.status_code != expect:
            self.errors.append(f"{method} {path[:60]}: {response.status_code} "
                               f"{response.text[:300]}")
            raise Dead(f"unexpected answer {response.status_code}")
        return response.json() if response.content else None

    # -- taking files --

    def take(self, choose: Callable[[list[RawFile]], RawFile | None]) -> RawFile | None:
        with self.lock:
            free = [f for f in self.files.values()
                    if f.node_id not in self.busy and not f.current.deleted]
            chosen = choose(free) if free else None
            if chosen is not None:
                self.busy.add(chosen.node_id)
            return chosen

    def release(self, file: RawFile) -> None:
        with self.lock:
            self.busy.discard(file.node_id)

    def known_blocks(self) -> list[bytes]:
        """Blocks of files this model holds (to share and deduplicate)."""
        with self.lock:
            return [b for f in self.files.values() for b in f.current.blocks]

    # -- writes --

    def _propose(self, file: RawFile, state: RawState) -> None:
        with self.lock:
            file.states.append(state)
            self.touched.add(file.node_id)

    def _settle(self, file: RawFile, state: RawState, missing: list[Json]) -> None:
        """The request that makes STATE was answered: STATE is now the one, its blocks
        not named as missing acknowledged."""
        wanted = {entry["block_id"] for entry in missing}
        with self.lock:
            state.acked = {b for b in state.ids if b not in wanted}
            file.states = [state]

    def new_file(self, node_id: str, parent: str) -> RawFile:
        file = RawFile(node_id, parent, [ABSENT])
        with self.lock:
            self.files[node_id] = file
            self.busy.add(node_id)
            self.touched.add(node_id)
        return file

    def create(self, file: RawFile, metadata: bytes, blocks: list[bytes]) -> list[Json]:
        state = RawState(1, metadata, tuple(blocks))
        self._propose(file, state)
        body = self.call("POST", "/files", 201, json={
            "id": file.node_id, "parent": file.parent, "kind": "file",
            "metadata": b64(metadata), "wrapped_key": b64(b"k"),
            "size": sum(map(len, blocks)),
            "blocks": [{"id": block_id(b), "size": len(b)} for b in blocks]})
        self._settle(file, state, body["upload"])
        return list(body["upload"])

    def update(self, file: RawFile, metadata: bytes, blocks: list[bytes] | None,
               parent: str | None = None) -> list[Json]:
        """A new version: new metadata, and new blocks (None: keep them), or a move."""
        old = file.current
        state = RawState(old.version + 1, metadata,
                         old.blocks if blocks is None else tuple(blocks))
        if blocks is None:
            state.acked = set(old.acked)
        self._propose(file, state)
        payload: Json = {"base_version": old.version, "metadata": b64(metadata),
                         "wrapped_key": b64(b"k")}
        if blocks is not None:
            payload["size"] = sum(map(len, blocks))
            payload["blocks"] = [{"id": block_id(b), "size": len(b)} for b in blocks]
        if parent is not None:
            payload["parent"] = parent
        body = self.call("PUT", f"/files/{file.node_id}", json=payload)
        self._settle(file, state, body["upload"])
        if parent is not None:
            file.parent = parent
        return list(body["upload"])

    def delete(self, file: RawFile) -> None:
        self._propose(file, RawState(-1, deleted=True))
        self.call("DELETE", f"/files/{file.node_id}",
                  params={"base_version": file.current.version})
        with self.lock:
            file.states = [RawState(-1, deleted=True)]

    def put_block(self, file: RawFile, entry: Json, data: bytes) -> None:
        """Send one block to its URL; acknowledged for FILE's version when answered."""
        self.call("PUT", entry["url"], content=data)
        with self.lock:
            for state in file.states[:1]:
                if entry["block_id"] in state.ids:
                    state.acked.add(entry["block_id"])

    def send_missing(self, file: RawFile, missing: list[Json]) -> None:
        by_id = {block_id(b): b for b in file.current.blocks}
        for entry in missing:
            self.put_block(file, entry, by_id[entry["block_id"]])

    def post_blocks(self, file: RawFile, missing: list[Json]) -> None:
        """The missing blocks in one POST /blocks (inline: each at most 64 KiB)."""
        by_id = {block_id(b): b for b in file.current.blocks}
        body = self.call("POST", "/blocks", json={"blocks": [
            {"id": entry["block_id"], "data": b64(by_id[entry["block_id"]])}
            for entry in missing]})
        with self.lock:
            for result in body["results"]:
                if not result["ok"]:
                    self.errors.append(f"POST /blocks refused {result}")
                elif result["block_id"] in file.current.ids:
                    file.current.acked.add(result["block_id"])

    def batch(self, operations: list[tuple[RawFile, RawState, Json]],
              inline: dict[str, bytes]) -> list[tuple[RawFile, list[Json]]]:
        """POST /batch/files: each (file, the state it makes, the operation); INLINE
        blocks ride along. Each answered ok settles its file; a refused one is an error."""
        for file, state, _ in operations:
            self._propose(file, state)
        body = self.call("POST", "/batch/files", json={
            "operations": [operation for _, _, operation in operations],
            "blocks": [{"id": i, "data": b64(d)} for i, d in inline.items()]})
        uploads = []
        for (file, state, operation), result in zip(operations, body["results"],
                                                    strict=True):
            if not result["ok"]:
                self.errors.append(f"batch {operation['op']} refused: {result['error']}")
                with self.lock:
                    file.states = file.states[:1]
                continue
            missing = list(result["result"]["upload"]) if not state.deleted else []
            self._settle(file, state, missing)
            uploads.append((file, missing))
        return uploads

    # -- reading back --

    def check(self, file: RawFile, tally: Tally, resume: bool = True) -> list[str]:
        """Read FILE back (module doc): the problems, each a loss; the candidates collapse
        to what was found, and an upload left midway is finished when RESUME."""
        response = self.device.client.get(f"/files/{file.node_id}")
        if response.status_code == 404:
            if any(s.deleted or s.version == 0 for s in file.states):
                with self.lock:
                    file.states = [RawState(-1, deleted=True)]
                return []
            return [f"file {file.node_id} is gone; it was {self._describe(file)}"]
        assert response.status_code == 200, response.text
        detail = response.json()
        node = detail["node"]
        if node["deleted"]:
            if any(s.deleted for s in file.states):
                with self.lock:
                    file.states = [RawState(-1, deleted=True)]
                return []
            return [f"file {file.node_id} is deleted; it was {self._describe(file)}"]
        matches = [s for s in file.states if s.version == node["version"]]
        if not matches:
            return [f"file {file.node_id} is at version {node['version']}; it was "
                    f"{self._describe(file)}"]
        state = matches[0]
        problems = []
        if base64.b64decode(node["metadata"]) != state.metadata:
            problems.append(f"file {file.node_id} v{state.version}: other metadata")
        if node["status"] == "uploaded":
            problems += self._read_back(file, state, detail["blocks"], tally)
        else:
            asked = {entry["block_id"] for entry in detail["blocks"]}
            lost = asked & state.acked
            if lost:
                problems.append(f"file {file.node_id} v{state.version}: acknowledged "
                                f"block(s) asked for again: {sorted(lost)}")
            elif state.complete:
                problems.append(f"file {file.node_id} v{state.version}: every block was "
                                f"acknowledged, yet it is {node['status']}")
        with self.lock:
            file.states = [state]
        if not problems and node["status"] != "uploaded" and resume:
            self.send_missing(file, list(detail["blocks"]))
            return self.check(file, tally, resume=False)
        return problems

    def _read_back(self, file: RawFile, state: RawState, urls: list[Json],
                   tally: Tally) -> list[str]:
        if [entry["block_id"] for entry in urls] != state.ids:
            return [f"file {file.node_id} v{state.version}: other blocks listed"]
        for position, (entry, data) in enumerate(zip(urls, state.blocks, strict=True)):
            response = self.device.client.get(entry["url"])
            if response.status_code != 200 or response.content != data:
                return [f"file {file.node_id} v{state.version} block {position} "
                        f"({entry['block_id'][:16]}): {response.status_code}, "
                        f"{'other bytes' if response.status_code == 200 else response.text}"]
        with self.lock:
            tally.blocks_checked += len(urls)
            tally.uploads_checked += 1
            state.acked = set(state.ids)
        return []

    def _describe(self, file: RawFile) -> str:
        return " or ".join(
            "deleted" if s.deleted else "never created" if s.version == 0 else
            f"v{s.version} ({len(s.acked)}/{len(s.blocks)} blocks acknowledged)"
            for s in file.states)

    def live(self) -> Iterator[RawFile]:
        with self.lock:
            files = list(self.files.values())
        yield from (f for f in files if not f.current.deleted)


# --- what the raw client does: each runs in worker threads until the appliance dies --

SMALL, MEDIUM = (200, 60_000), (70_000, 260_000)   # packed / erasure-coded blocks
LOOPS = 400                                        # a worker's requests per round, at most


def blocks_of(rng: random.Random, count: int, medium_share: float) -> list[bytes]:
    return [rng.randbytes(rng.randint(*(MEDIUM if rng.random() < medium_share else SMALL)))
            for _ in range(count)]


def send(raw: Raw, file: RawFile, missing: list[Json]) -> None:
    """What the appliance asked for: small blocks in one POST /blocks, others by URL."""
    small = [e for e in missing if e["size"] <= SMALL[1]]
    if small:
        raw.post_blocks(file, small)
    raw.send_missing(file, [e for e in missing if e["size"] > SMALL[1]])


def upload_work(raw: Raw, rng: random.Random, parents: list[str]) -> None:
    for _ in range(LOOPS):
        file = raw.new_file(new_node_id(), rng.choice(parents))
        try:
            missing = raw.create(file, rng.randbytes(20), blocks_of(rng, rng.randint(2, 6), 0.6))
            rng.shuffle(missing)
            raw.send_missing(file, missing)
        finally:
            raw.release(file)


def commit_work(raw: Raw, rng: random.Random, parents: list[str],
                pool: list[bytes] | None = None) -> None:
    """Creates sharing known blocks (POOL, else the model's), new versions, moves and
    deletes."""
    for _ in range(LOOPS):
        known = pool or raw.known_blocks() or blocks_of(rng, 2, 0.5)
        roll = rng.random()
        if roll < 0.4:
            new = raw.new_file(new_node_id(), rng.choice(parents))
            try:
                blocks = rng.sample(known, min(len(known), rng.randint(1, 3)))
                send(raw, new, raw.create(new, rng.randbytes(20),
                                          blocks + blocks_of(rng, rng.randint(0, 1), 0.2)))
            finally:
                raw.release(new)
            continue
        file = raw.take(rng.choice)
        if file is None:
            continue
        try:
            if roll < 0.55:
                send(raw, file, raw.update(file, rng.randbytes(20), None))
            elif roll < 0.7:
                raw.update(file, rng.randbytes(20), None, parent=rng.choice(parents))
            elif roll < 0.88:
                blocks = rng.sample(known, min(len(known), 2)) + blocks_of(rng, 1, 0.3)
                send(raw, file, raw.update(file, rng.randbytes(20), blocks))
            else:
                raw.delete(file)
        finally:
            raw.release(file)


def batch_work(raw: Raw, rng: random.Random, parents: list[str]) -> None:
    for _ in range(LOOPS):
        operations: list[tuple[RawFile, RawState, Json]] = []
        inline: dict[str, bytes] = {}
        taken: list[RawFile] = []
        try:
            for _ in range(rng.randint(3, 12)):
                roll = rng.random()
                existing = raw.take(rng.choice) if roll >= 0.6 else None
                if existing is not None and roll >= 0.85:
                    taken.append(existing)
                    operations.append((existing, RawState(-1, deleted=True), {
                        "op": "delete", "node_id": existing.node_id,
                        "base_version": existing.current.version}))
                    continue
                blocks = blocks_of(rng, rng.randint(1, 2), 0.25)
                inline.update({block_id(b): b for b in blocks
                               if len(b) <= SMALL[1] and rng.random() < 0.8})
                metadata = rng.randbytes(20)
                content = {"metadata": b64(metadata), "wrapped_key": b64(b"k"),
                           "size": sum(map(len, blocks)),
                           "blocks": [{"id": block_id(b), "size": len(b)} for b in blocks]}
                file = existing or raw.new_file(new_node_id(), rng.choice(parents))
                taken.append(file)
                if existing is None:
                    operations.append((file, RawState(1, metadata, tuple(blocks)), {
                        "op": "create", "id": file.node_id, "parent": file.parent,
                        "kind": "file", **content}))
                else:
                    version = existing.current.version
                    operations.append((file, RawState(version + 1, metadata, tuple(blocks)), {
                        "op": "update", "node_id": file.node_id, "base_version": version,
                        **content}))
            for file, missing in raw.batch(operations, inline):
                send(raw, file, missing)
        finally:
            for file in taken:
                raw.release(file)


# --- sync folders ---------------------------------------------------------------------------

def copy_of(path: str) -> str:
    """What a conflicted copy of PATH starts with: `dir/name (conflicted copy from `."""
    folder, _, name = path.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{folder + '/' if folder else ''}{stem} ({COPY} "


def sync_problems(tree: dict[str, bytes | None], expected: dict[str, bytes],
                  contested: dict[str, set[bytes]]) -> list[str]:
    """How a converged folder TREE falls short of EXPECTED (path -> bytes of every file
    written, the last write of each), where CONTESTED paths were written on both devices
    at once: there each version must be kept, one under the name and the others as
    conflicted copies beside it. Any other file, or a copy of an uncontested path, is a
    problem too. Empty when all is well."""
    files = {path: data for path, data in tree.items() if data is not None}
    problems = []
    for path, data in expected.items():
        if path in contested:
            continue
        if path not in files:
            problems.append(f"{path}: missing ({len(data)} bytes lost)")
        elif files[path] != data:
            problems.append(f"{path}: other bytes ({len(files[path] or b'')} instead of "
                            f"{len(data)})")
    explained = set(expected) - set(contested)
    for path, versions in contested.items():
        near = {p: d for p, d in files.items()
                if p == path or p.startswith(copy_of(path))}
        kept = set(near.values())
        if path not in files or not versions <= kept:
            problems.append(f"{path}: written on both devices; {len(versions - kept)} of "
                            f"{len(versions)} versions lost ({sorted(near)})")
        explained |= set(near)
    problems += [f"{path}: not written by anyone" for path in sorted(set(files) - explained)]
    return problems
