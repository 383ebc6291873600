#!/usr/bin/env python3
"""Benchmark of the appliance API over HTTPS, against a real `cairnd serve`, in one run.

Starts a fresh appliance (six disk folders, k=4, m=2) as a subprocess on 127.0.0.1:0,
enrolls one device the way an agent does, creates its root folder, and measures:

- block upload throughput: --size-mib MiB of distinct 4 MiB blocks PUT to their pre-signed
  URLs, --concurrency in flight, as a ratio to the block store's own put speed measured in
  the same run (`BlockStore.put` in a process of its own, on a fresh store of the same
  layout on the same filesystem, as many blocks of the same kind, same concurrency; once
  before and once after the upload), and to dd write x 4/6 (issue 4), and beside the same
  PUTs to a bare ASGI app on the appliance's own HTTPS serving (the stack's ceiling);
- block download throughput: every uploaded block GET from its URL, as a ratio to dd write;
- with --compare-clients, httpx.AsyncClient under trio against httpx.Client in worker
  threads for block PUT and GET (bench/api_clients.py), for the agent's choice;
- batched node creations per second: POST /batch/files with 1,000 creates per request,
  while growing the tree to --nodes nodes (folders of 999 files, ten per top folder);
- incremental GET /changes latency at tree sizes 1k, 10k and 100k nodes: create one node,
  then time the fetch of the changes since the cursor before it (median of --reps), and
  the ratio of the latency at the largest tree to the smallest (it should stay ~1);
- single node creations per second, one POST /files at a time on one keep-alive
  connection, then --concurrency at a time on as many connections (in the full tree);
- the peak RSS of this process and of the appliance (neither may grow with the sizes).

Only loopback traffic; every loop is bounded by a count and by --phase-timeout. The run
works in a fresh folder under bench/out/ and deletes it at the end unless --keep is given.
The device rate limit is raised in the appliance's config for the run (the default, 200
requests/s per device, would otherwise be what the create figures measure).

    .venv/bin/python bench/api.py [--size-mib 1024] [--nodes 100000] [--concurrency 8]
    .venv/bin/python bench/api.py --quick       # 256 MiB, 10,000 nodes: a sanity check
    .venv/bin/python bench/api.py --transfer-only [--compare-clients]   # blocks only

See docs/benchmarks.md for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import multiprocessing
import os
import queue
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

import apsw  # noqa: E402
import httpx  # noqa: E402
from api_clients import KINDS as CLIENT_KINDS  # noqa: E402
from api_clients import ClientRun, Transfer, format_runs  # noqa: E402
from blockstore import (  # noqa: E402
    BLOCK_SIZE,
    MIB,
    Blocks,
    Run,
    make_store,
    measure_dd,
    parallel,
)
from harness import (  # noqa: E402
    Appliance as Server,
)
from harness import (  # noqa: E402
    BenchError,
    CacheDropper,
    Figure,
    Layout,
    cpu_seconds,
    format_table,
    join,
    machine_info,
    own_cpu_seconds,
    own_peak_rss_mib,
    own_rss_mib,
    peak_rss_mib,
    pinned_context,
    say,
)
from harness import running_appliance as running_home  # noqa: E402

from agent.home import AgentHome  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.meta import journal, tree  # noqa: E402

DATA_SHARDS, PARITY_SHARDS, DISKS = 4, 2, 6
USER = "bench"
BATCH_SIZE = 1000                    # the API's maximum operations per batch
FILES_PER_FOLDER = 999
FOLDERS_PER_TOP = 10
CHECKPOINTS = (1_000, 10_000, 100_000)
METADATA_BYTES = 160                 # an encrypted name, mode and times, with AEAD overhead
WRAPPED_KEY_BYTES = 72               # a 32-byte node key, nonce and tag
REQUEST_TIMEOUT_S = 60.0
FEED_READ_REPS = 1000
BENCH_RATE_LIMIT = 1e6               # requests/s and burst per device, for this run only
BARE_SERVER = "--bare-asgi-server"   # internal: run the bare ASGI app (see bare_server_main)

# Targets of the API issue.
TARGET_UPLOAD = 0.8                  # x block store put
CLIENT_IN_FLIGHT = (4, 8)            # --compare-clients
TARGET_TRANSFER = 0.8                # upload x (dd write x 4/6), download x dd write (issue 4)
TARGET_CHANGES_FLAT = 1.5            # latency at the largest tree / at the smallest, at most


# -- the appliance ------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """The API as one enrolled device sees it (or the bare ASGI app, which has no users)."""

    url: str
    certificate: Path
    token: str
    pid: int

    def client(self) -> httpx.Client:
        """A new keep-alive connection pinned to the appliance's certificate."""
        return httpx.Client(base_url=self.url, verify=pinned_context(self.certificate),
                            timeout=REQUEST_TIMEOUT_S,
                            headers={"Authorization": f"Bearer {self.token}"})

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        return cpu_seconds(self.pid)

    def peak_rss_mib(self) -> float:
        return peak_rss_mib(self.pid)


@contextmanager
def running_appliance(run_dir: Path) -> Iterator[tuple[Endpoint, Server]]:
    """A fresh home, `cairnd serve` on 127.0.0.1:0, and one device joined by `cairn join`."""
    with running_home(run_dir, USER, Layout(DISKS, DATA_SHARDS, PARITY_SHARDS),
                      rate_limit_per_s=BENCH_RATE_LIMIT,
                      rate_limit_burst=int(BENCH_RATE_LIMIT)) as (server, code):
        device = AgentHome(join(run_dir / "device", server.url, code, "bench")).load_device()
        yield Endpoint(server.url, server.certificate, device.token, server.pid), server


def expect(response: httpx.Response, status: int) -> Any:
    if response.status_code != status:
        request = response.request
        raise BenchError(f"{request.method} {request.url.path}: HTTP {response.status_code}, "
                         f"expected {status}: {response.text[:500]}")
    return response.json()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_id() -> str:
    return os.urandom(16).hex()


def create_body(parent: str | None, kind: str, node_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"parent": parent, "kind": kind,
                            "metadata": b64(os.urandom(METADATA_BYTES)),
                            "wrapped_key": b64(os.urandom(WRAPPED_KEY_BYTES))}
    if kind == "file":
        body.update(size=0, blocks=[])
    if node_id is not None:
        body["id"] = node_id
    return body


def create(client: httpx.Client, parent: str | None, kind: str = "file") -> str:
    node_id: str = expect(client.post("/files", json=create_body(parent, kind)), 201)["node"]["id"]
    return node_id


class ClientPool:
    """One keep-alive connection per worker thread of `parallel`, opened (TLS handshake
    done) before the clock starts."""

    def __init__(self, appliance: Endpoint, size: int, warm_path: str = "/me") -> None:
        self.clients = [appliance.client() for _ in range(size)]
        self._free: queue.SimpleQueue[httpx.Client] = queue.SimpleQueue()
        for client in self.clients:
            expect(client.get(warm_path), 200)
            self._free.put(client)
        self._local = threading.local()

    def get(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._free.get_nowait()
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()


# -- block upload -------------------------------------------------------------------------


def store_put(blocks: Blocks, folder: Path, concurrency: int, timeout: float) -> Run:
    """BlockStore.put of every block on a fresh store of the appliance's layout."""
    store = make_store(folder, DISKS, DATA_SHARDS, PARITY_SHARDS)
    try:
        def put(index: int) -> None:
            result = store.put(blocks.ids[index], blocks.make(index))
            if result.degraded or result.already_stored:
                raise BenchError(f"store put {index}: {result}")

        return parallel(put, blocks.count, concurrency, timeout)
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


def _store_put_child(folder: str, count: int, concurrency: int,
                     timeout: float) -> tuple[int, float, bool, float]:
    blocks = Blocks(count, BLOCK_SIZE)
    cpu_before = own_cpu_seconds()
    run = store_put(blocks, Path(folder), concurrency, timeout)
    return run.done, run.seconds, run.timed_out, own_cpu_seconds() - cpu_before


def store_put_in_child(folder: Path, count: int, concurrency: int,
                       timeout: float) -> tuple[Run, float]:
    """store_put of `count` fresh random blocks in a new process, as the appliance's store
    runs in its own: the malloc tuning a BlockStore applies (appliance/storage/allocator.py:
    freed block buffers stay in the process) then stays out of this one, the client's.
    Returns the run and the CPU seconds per GB the put took (building blocks included)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        done, seconds, timed_out, cpu = pool.submit(_store_put_child, str(folder), count,
                                                    concurrency, timeout).result()
    return Run(done, seconds, timed_out), cpu / max(done * BLOCK_SIZE / 1e9, 1e-9)


def create_file(appliance: Endpoint, root: str, blocks: Blocks) -> tuple[str, list[str], float]:
    """POST /files of one file of every block; (node id, upload URLs in block order,
    seconds the create took)."""
    with appliance.client() as client:
        body = create_body(root, "file")
        body.update(size=blocks.count * blocks.size,
                    blocks=[{"id": block_id, "size": blocks.size} for block_id in blocks.ids])
        started = time.perf_counter()
        written = expect(client.post("/files", json=body), 201)
        create_seconds = time.perf_counter() - started
    urls = {entry["block_id"]: entry["url"] for entry in written["upload"]}
    if len(urls) != blocks.count:
        raise BenchError(f"POST /files answered {len(urls)} upload URLs for "
                         f"{blocks.count} new blocks")
    return written["node"]["id"], [urls[block_id] for block_id in blocks.ids], create_seconds


def check_uploaded(appliance: Endpoint, node_id: str) -> None:
    with appliance.client() as client:
        status = expect(client.get(f"/files/{node_id}"), 200)["node"]["status"]
    if status != "uploaded":
        raise BenchError(f"every block was PUT but the file is {status!r}")


def api_upload(appliance: Endpoint, root: str, blocks: Blocks, concurrency: int,
               timeout: float) -> tuple[Run, float, str]:
    """Create one file of every block, PUT each block to its pre-signed URL; returns the
    upload run, the seconds the create took and the file's node id."""
    node_id, urls, create_seconds = create_file(appliance, root, blocks)
    pool = ClientPool(appliance, concurrency)
    try:
        def put(index: int) -> None:
            response = pool.get().put(urls[index], content=blocks.make(index),
                                      headers={"Content-Type": "application/octet-stream"})
            stored = expect(response, 200)
            if not stored["ok"]:
                raise BenchError(f"PUT block {index}: {stored}")

        run = parallel(put, blocks.count, concurrency, timeout)
    finally:
        pool.close()
    if not run.timed_out:
        check_uploaded(appliance, node_id)
    return run, create_seconds, node_id


def download_urls(appliance: Endpoint, node_id: str, count: int) -> list[str]:
    """The file's download URLs in block order (GET /files/{id})."""
    with appliance.client() as client:
        detail = expect(client.get(f"/files/{node_id}"), 200)
    urls = [entry["url"] for entry in detail["blocks"]]
    if detail["method"] != "GET" or len(urls) != count:
        raise BenchError(f"GET /files/{node_id} answered {len(urls)} {detail['method']} "
                         f"URLs for {count} blocks")
    return urls


def api_download(appliance: Endpoint, urls: list[str], blocks: Blocks, concurrency: int,
                 timeout: float) -> Run:
    """GET every block from its pre-signed URL, `concurrency` in flight, one keep-alive
    connection per thread; each answer is checked (length and the index in its head)."""
    pool = ClientPool(appliance, concurrency)
    try:
        def get(index: int) -> None:
            response = pool.get().get(urls[index])
            if response.status_code != 200:
                expect(response, 200)
            blocks.check(index, response.content)

        return parallel(get, len(urls), concurrency, timeout)
    finally:
        pool.close()


# -- the HTTP stack's own ceiling ----------------------------------------------------------


def bare_server_main(home: Path) -> None:
    """Serve an ASGI app that only reads each request body and answers `{"ok": true}`,
    with the appliance's own hypercorn settings and certificate, on 127.0.0.1:0; print
    the port. What the HTTPS stack allows before the appliance does any work."""
    import trio

    from appliance.https import serve_https
    from appliance.serve import bind_listening_socket, hypercorn_config
    from appliance.storage import allocator

    allocator.tune()  # as BlockStore does in the appliance: no page faults per buffer
    sock = bind_listening_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    hc = hypercorn_config(load_config(home))
    answer = b'{"ok":true}'

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        b"".join(chunks)  # the body, as the block route has it
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_https, app, hc, sock,
                                        shutdown_trigger=trio.sleep_forever))
            print(f"port {port}", flush=True)

    trio.run(run)


@contextmanager
def bare_server(home: Path, certificate: Path) -> Iterator[Endpoint]:
    process = subprocess.Popen([sys.executable, __file__, BARE_SERVER, str(home)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("port "):
            raise BenchError(f"the bare ASGI server did not start (said {line!r})")
        yield Endpoint(f"https://127.0.0.1:{int(line.split()[1])}", certificate, "unused",
                        process.pid)
    finally:
        process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def bare_upload(server: Endpoint, blocks: Blocks, concurrency: int, timeout: float) -> Run:
    """The same PUTs of the same blocks, to the bare ASGI app."""
    pool = ClientPool(server, concurrency, warm_path="/")
    try:
        def put(index: int) -> None:
            response = pool.get().put(f"/blocks/{blocks.ids[index]}",
                                      content=blocks.make(index),
                                      headers={"Content-Type": "application/octet-stream"})
            expect(response, 200)

        return parallel(put, blocks.count, concurrency, timeout)
    finally:
        pool.close()


# -- the tree and the changes feed --------------------------------------------------------


class TreeBuilder:
    """Grows the caller's tree with batched creates: top folders under the root, each
    with FOLDERS_PER_TOP folders of FILES_PER_FOLDER empty files."""

    def __init__(self, client: httpx.Client, root: str, nodes: int) -> None:
        self.client = client
        self.root = root
        self.nodes = nodes             # nodes in the tree now, this builder's and others'
        self.top: str | None = None
        self.folder: str | None = None
        self.folders_in_top = 0
        self.files_in_folder = 0

    def _operations(self, count: int) -> list[dict[str, Any]]:
        operations: list[dict[str, Any]] = []
        while len(operations) < count:
            folder_full = self.folder is None or self.files_in_folder >= FILES_PER_FOLDER
            if self.top is None or (folder_full and self.folders_in_top >= FOLDERS_PER_TOP):
                self.top, self.folder, self.folders_in_top = new_id(), None, 0
                operations.append({"op": "create", **create_body(self.root, "dir", self.top)})
            elif folder_full:
                self.folder, self.files_in_folder = new_id(), 0
                self.folders_in_top += 1
                operations.append({"op": "create", **create_body(self.top, "dir",
                                                                 self.folder)})
            else:
                self.files_in_folder += 1
                operations.append({"op": "create", **create_body(self.folder, "file")})
        return operations

    def grow_to(self, target: int, deadline: float) -> tuple[int, float]:
        """Batched creates until the tree has `target` nodes; (created, request seconds)."""
        created, seconds = 0, 0.0
        while self.nodes < target and time.monotonic() < deadline:
            operations = self._operations(min(BATCH_SIZE, target - self.nodes))
            started = time.perf_counter()
            results = expect(self.client.post("/batch/files",
                                              json={"operations": operations}), 200)["results"]
            seconds += time.perf_counter() - started
            failed = [r["error"] for r in results if not r["ok"]]
            if len(results) != len(operations) or failed:
                raise BenchError(f"POST /batch/files: {len(failed)} of {len(operations)} "
                                 f"creates failed, first {failed[:1]}")
            self.nodes += len(operations)
            created += len(operations)
        return created, seconds


@dataclass
class Latencies:
    changes_ms: list[float]
    create_ms: list[float]
    me_ms: list[float]           # GET /me: an authenticated request with one small read

    @staticmethod
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @staticmethod
    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else float("nan")


def changes_latency(client: httpx.Client, parent: str, reps: int,
                    deadline: float) -> Latencies:
    """`reps` times (after one untimed warm-up): create one node, then time GET /changes
    from the cursor before it, which must answer exactly that one change."""
    cursor = int(expect(client.get("/me"), 200)["latest_cursor"])
    result = Latencies([], [], [])
    for rep in range(reps + 1):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        node_id = create(client, parent)
        created = time.perf_counter()
        page = expect(client.get("/changes", params={"cursor": cursor}), 200)
        fetched = time.perf_counter()
        got = [change["node_id"] for change in page["changes"]]
        if got != [node_id] or page["has_more"]:
            raise BenchError(f"GET /changes?cursor={cursor} after one create answered "
                             f"{len(got)} changes (expected just {node_id})")
        cursor = int(page["cursor"])
        expect(client.get("/me"), 200)
        if rep:
            result.create_ms.append((created - started) * 1000)
            result.changes_ms.append((fetched - created) * 1000)
            result.me_ms.append((time.perf_counter() - fetched) * 1000)
    return result


def feed_read_us(database: Path, reps: int, deadline: float) -> float:
    """Median microseconds of what GET /changes reads for one new change (the feed page,
    then each change's node and visibility), run here on the appliance's database through
    a read-only connection: the query's own cost, without HTTP's."""
    db = apsw.Connection(str(database), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        row = db.execute("SELECT id FROM users WHERE name = ?", (USER,)).fetchone()
        if row is None:
            raise BenchError(f"no user {USER!r} in {database}")
        user_id = int(row[0])
        after = journal.latest_cursor(db, user_id) - 1
        samples = []
        for _ in range(reps):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            db.execute("BEGIN")
            try:
                page = journal.feed_page(db, user_id, after, 1001)
                for change in page:
                    node = tree.find_node(db, change.node_id)
                    if node is None or not tree.can_read(db, user_id, node):
                        raise BenchError(f"change {change.cursor}: node not readable")
            finally:
                db.execute("COMMIT")
            samples.append((time.perf_counter() - started) * 1e6)
            if len(page) != 1:
                raise BenchError(f"the feed after cursor {after} has {len(page)} changes")
        return statistics.median(samples) if samples else float("nan")
    finally:
        db.close()


# -- node creations -----------------------------------------------------------------------


def single_creates(client: httpx.Client, parent: str, count: int,
                   deadline: float) -> tuple[int, float, list[float]]:
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        before = time.perf_counter()
        create(client, parent)
        latencies.append((time.perf_counter() - before) * 1000)
    return len(latencies), time.perf_counter() - started, latencies


def concurrent_creates(appliance: Endpoint, parent: str, count: int, concurrency: int,
                       timeout: float) -> Run:
    pool = ClientPool(appliance, concurrency)

    def one(_: int) -> None:
        create(pool.get(), parent)

    try:
        return parallel(one, count, concurrency, timeout)
    finally:
        pool.close()


# -- the run ------------------------------------------------------------------------------


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rss_mib: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    client_table: str = ""

    def mark_rss(self, phase: str) -> None:
        self.rss_mib[phase] = own_rss_mib()


def mbs(run: Run) -> float:
    return run.done * BLOCK_SIZE / run.seconds / 1e6


def cpu_per_gb(server: Endpoint, run_upload: Callable[[], Run]) -> tuple[Run, float, float]:
    """Run an upload; also return server and bench CPU seconds per GB it took."""
    server_before, own_before = server.cpu_seconds(), own_cpu_seconds()
    run = run_upload()
    gb = max(run.done, 1) * BLOCK_SIZE / 1e9
    return (run, (server.cpu_seconds() - server_before) / gb,
            (own_cpu_seconds() - own_before) / gb)


def transfer_phase(res: Results, args: argparse.Namespace, run_dir: Path,
                   appliance: Endpoint, root: str) -> None:
    """dd write, store put, API upload, API download, bare-stack upload, store put again."""
    count, conc, timeout = max(1, args.size_mib * MIB // BLOCK_SIZE), args.concurrency, \
        args.phase_timeout
    say(f"dd write: {count * 4} MiB, conv=fdatasync ...")
    dd_write, _ = measure_dd(run_dir, count * 4, CacheDropper(), timeout)
    say(f"  {dd_write:,.0f} MB/s")
    say(f"generating ids of {count} distinct 4 MiB blocks ...")
    blocks = Blocks(count, BLOCK_SIZE)

    say(f"store put (before): {count} blocks, {conc} in flight, fresh store, own process ...")
    before_run, store_cpu = store_put_in_child(run_dir / "store-before", count, conc, timeout)
    before = mbs(before_run)
    say(f"  {before:,.0f} MB/s, {store_cpu:.1f} s CPU per GB")
    res.mark_rss("after_store_put")

    say(f"API upload: {count} blocks PUT to pre-signed URLs, {conc} in flight ...")
    made: list[tuple[float, str]] = []

    def upload_via_api() -> Run:
        run, seconds, node_id = api_upload(appliance, root, blocks, conc, timeout)
        made.append((seconds, node_id))
        return run

    upload, upload_server_cpu, upload_own_cpu = cpu_per_gb(appliance, upload_via_api)
    say(f"  {mbs(upload):,.0f} MB/s; appliance peak RSS {appliance.peak_rss_mib():.0f} MiB")
    if upload.timed_out:
        res.notes.append(f"upload stopped at the {timeout:.0f} s limit after "
                         f"{upload.done} blocks")
    res.mark_rss("after_upload")
    create_seconds, node_id = made[0]

    say(f"API download: {count} blocks GET from pre-signed URLs, {conc} in flight ...")
    urls = download_urls(appliance, node_id, count)
    download, download_server_cpu, download_own_cpu = cpu_per_gb(
        appliance, lambda: api_download(appliance, urls, blocks, conc, timeout))
    say(f"  {mbs(download):,.0f} MB/s; appliance peak RSS {appliance.peak_rss_mib():.0f} MiB")
    res.mark_rss("after_download")
    res.extra["appliance_peak_rss_after_transfer_mib"] = round(appliance.peak_rss_mib(), 1)

    say(f"bare ASGI app, same hypercorn/TLS: {count} PUTs, {conc} in flight ...")
    with bare_server(run_dir / "home", appliance.certificate) as bare:
        stack, stack_server_cpu, stack_own_cpu = cpu_per_gb(
            bare, lambda: bare_upload(bare, blocks, conc, timeout))
    say(f"  {mbs(stack):,.0f} MB/s")
    res.mark_rss("after_bare_upload")

    say(f"store put (after): {count} blocks, {conc} in flight, fresh store, own process ...")
    after = mbs(store_put_in_child(run_dir / "store-after", count, conc, timeout)[0])
    say(f"  {after:,.0f} MB/s")
    res.mark_rss("after_store_put_again")

    store = (before + after) / 2
    upload_note = (f"{upload.done} PUTs to pre-signed URLs in {upload.seconds:.2f} s, one "
                   f"keep-alive connection each; the POST /files of the {count}-block file "
                   f"took {create_seconds * 1000:.0f} ms (not counted); "
                   f"{mbs(upload) / mbs(stack):.2f} x the bare ASGI app's figure; CPU per "
                   f"GB: appliance {upload_server_cpu:.1f} s, bench client "
                   f"{upload_own_cpu:.1f} s")
    res.figures += [
        Figure("dd write (conv=fdatasync)", dd_write, "MB/s",
               note=f"{count * 4} MiB in 4 MiB writes, in the run's folder"),
        Figure(f"store put 4 MiB blocks (x{conc})", store, "MB/s",
               note=f"BlockStore.put in a process of its own on a fresh {DISKS}-disk store, "
                    f"before/after the upload: {before:,.0f} / {after:,.0f} MB/s; CPU per "
                    f"GB (before) {store_cpu:.1f} s"),
        Figure(f"API upload 4 MiB blocks, HTTPS (x{conc})", mbs(upload), "MB/s", store,
               "MB/s store put", TARGET_UPLOAD, note=upload_note),
        Figure(f"API upload vs dd (x{conc})", mbs(upload), "MB/s",
               dd_write * DATA_SHARDS / (DATA_SHARDS + PARITY_SHARDS),
               "MB/s dd write x 4/6", TARGET_TRANSFER,
               note="the same upload, judged against the disk (issue 4)"),
        Figure(f"API download 4 MiB blocks, HTTPS (x{conc})", mbs(download), "MB/s",
               dd_write, "MB/s dd write", TARGET_TRANSFER,
               note=f"{download.done} GETs of the uploaded blocks in {download.seconds:.2f} "
                    "s, each checked; CPU per GB: appliance "
                    f"{download_server_cpu:.1f} s, bench client {download_own_cpu:.1f} s"),
        Figure(f"bare ASGI app, same HTTPS stack (x{conc})", mbs(stack), "MB/s", store,
               "MB/s store put",
               note=f"{stack.done} PUTs of the same blocks in {stack.seconds:.2f} s to an app "
                    "that only reads the body, under the appliance's own HTTPS serving "
                    "(appliance.https): the ceiling the stack sets for an upload; CPU per "
                    f"GB: server {stack_server_cpu:.1f} s, bench client "
                    f"{stack_own_cpu:.1f} s"),
    ]
    res.extra["transfer_cpu_s_per_gb"] = {
        "appliance_upload": round(upload_server_cpu, 2), "client_upload": round(upload_own_cpu, 2),
        "appliance_download": round(download_server_cpu, 2),
        "client_download": round(download_own_cpu, 2),
        "bare_server": round(stack_server_cpu, 2), "bare_client": round(stack_own_cpu, 2),
        "store_put": round(store_cpu, 2)}


def clients_phase(res: Results, args: argparse.Namespace, appliance: Endpoint,
                  root: str) -> None:
    """httpx.AsyncClient under trio against httpx.Client in worker threads, PUT then GET
    of a fresh file, at 4 and 8 in flight (bench/api_clients.py)."""
    count = max(1, args.clients_size_mib * MIB // BLOCK_SIZE)
    runs: list[ClientRun] = []
    for in_flight in CLIENT_IN_FLIGHT:
        for kind in CLIENT_KINDS:
            say(f"client {kind}, {in_flight} in flight: {count} PUTs, then {count} GETs ...")
            blocks = Blocks(count, BLOCK_SIZE)
            node_id, urls, _ = create_file(appliance, root, blocks)
            transfer = Transfer(appliance.url, pinned_context(appliance.certificate), blocks,
                                args.phase_timeout)
            put = transfer.run(kind, "PUT", urls, in_flight)
            if put.blocks == count:
                check_uploaded(appliance, node_id)
                get = transfer.run(kind, "GET", download_urls(appliance, node_id, count),
                                   in_flight)
                runs += [put, get]
                say(f"  PUT {put.mb_s:,.0f} MB/s, GET {get.mb_s:,.0f} MB/s")
            else:
                res.notes.append(f"client {kind} x{in_flight}: PUTs stopped at the "
                                 f"{args.phase_timeout:.0f} s limit")
    res.extra["clients"] = [run.to_json() for run in runs]
    res.client_table = format_runs(runs)
    res.mark_rss("after_clients")


def tree_phase(res: Results, args: argparse.Namespace, run_dir: Path, client: httpx.Client,
               root: str) -> int:
    """Batched creates while the tree grows; /changes latency and the feed read alone at
    each checkpoint. Returns the nodes in the tree."""
    timeout = args.phase_timeout
    probe_folder = create(client, root, "dir")
    builder = TreeBuilder(client, root, nodes=3)  # the root, the uploaded file, probes
    checkpoints = sorted({c for c in CHECKPOINTS if c < args.nodes} | {args.nodes})
    latency: dict[int, Latencies] = {}
    query_us: dict[int, float] = {}
    batch_created, batch_seconds = 0, 0.0
    segments = []
    for checkpoint in checkpoints:
        say(f"tree: batched creates up to {checkpoint:,} nodes ...")
        start_nodes = builder.nodes
        created, seconds = builder.grow_to(checkpoint, time.monotonic() + timeout)
        batch_created += created
        batch_seconds += seconds
        if created:
            segments.append({"from": start_nodes, "to": builder.nodes,
                             "creates_per_s": round(created / seconds, 1)})
            say(f"  {created:,} creates in {seconds:.2f} s: {created / seconds:,.0f}/s")
        if builder.nodes < checkpoint:
            res.notes.append(f"tree growth stopped at the {timeout:.0f} s limit with "
                             f"{builder.nodes} nodes")
            break
        lat = latency[checkpoint] = changes_latency(client, probe_folder, args.reps,
                                                    time.monotonic() + timeout)
        builder.nodes += len(lat.create_ms) + 1
        query_us[checkpoint] = feed_read_us(run_dir / "home" / "appliance.db",
                                            FEED_READ_REPS, time.monotonic() + timeout)
        res.mark_rss(f"at_{checkpoint}_nodes")
        say(f"  /changes after one create at {checkpoint:,} nodes: median "
            f"{lat.median(lat.changes_ms):.2f} ms, p90 {lat.p90(lat.changes_ms):.2f} ms "
            f"(the create: {lat.median(lat.create_ms):.2f} ms); the feed read alone: "
            f"{query_us[checkpoint]:.0f} us")

    if batch_seconds:
        res.figures.append(Figure(
            f"creates, batched ({BATCH_SIZE:,} per request)", batch_created / batch_seconds,
            "nodes/s",
            note=f"{batch_created:,} creates in {batch_seconds:.2f} s of requests; by "
                 "segment: " + ", ".join(f"{s['from']:,}-{s['to']:,} nodes "
                                         f"{s['creates_per_s']:,.0f}/s" for s in segments)))
    sizes = sorted(latency)
    for size in sizes:
        lat, first = latency[size], latency[sizes[0]]
        last = size == sizes[-1] and len(sizes) > 1
        res.figures.append(Figure(
            f"/changes, 1 new change, {size:,} nodes", lat.median(lat.changes_ms), "ms",
            first.median(first.changes_ms) if last else None, f"ms at {sizes[0]:,} nodes",
            TARGET_CHANGES_FLAT if last else None, at_most=True,
            note=f"median of {len(lat.changes_ms)}, p90 {lat.p90(lat.changes_ms):.2f} ms; "
                 f"for scale, GET /me {lat.median(lat.me_ms):.2f} ms and the create before "
                 f"it {lat.median(lat.create_ms):.2f} ms (medians); the feed read alone "
                 f"{query_us[size]:.0f} us"))
    if len(sizes) > 1:
        res.figures.append(Figure(
            f"feed read alone (SQLite), {sizes[-1]:,} nodes", query_us[sizes[-1]], "us",
            query_us[sizes[0]], f"us at {sizes[0]:,} nodes",
            note=f"median of {FEED_READ_REPS} runs of the route's read for one new change, "
                 "in this process on the appliance's database; by tree size: "
                 + ", ".join(f"{n:,} {v:.0f} us" for n, v in query_us.items())))
    res.extra["changes_latency_ms"] = {
        str(size): {"median": round(Latencies.median(v.changes_ms), 3),
                    "p90": round(Latencies.p90(v.changes_ms), 3),
                    "create_median": round(Latencies.median(v.create_ms), 3),
                    "me_median": round(Latencies.median(v.me_ms), 3),
                    "feed_read_alone_us": round(query_us[size], 1),
                    "samples": len(v.changes_ms)}
        for size, v in latency.items()}
    res.extra["batch_segments"] = segments
    return builder.nodes


def creates_phase(res: Results, args: argparse.Namespace, appliance: Endpoint,
                  client: httpx.Client, root: str, nodes: int) -> None:
    """Single creates, one connection then --concurrency connections."""
    folder = create(client, root, "dir")
    say(f"creates one at a time: {args.creates}, one connection, {nodes:,} nodes in the "
        "tree ...")
    done, seconds, lat_ms = single_creates(client, folder, args.creates,
                                           time.monotonic() + args.phase_timeout)
    res.figures.append(Figure(
        "creates, one at a time", done / seconds, "nodes/s",
        note=f"{done} POST /files in {seconds:.2f} s, median {statistics.median(lat_ms):.2f} "
             f"ms, p90 {Latencies.p90(lat_ms):.2f} ms each, in a tree of {nodes:,} nodes"))
    say(f"  {done / seconds:,.0f}/s")
    conc = args.concurrency
    say(f"creates, {conc} connections: {args.creates} ...")
    run = concurrent_creates(appliance, folder, args.creates, conc, args.phase_timeout)
    res.figures.append(Figure(f"creates, {conc} connections", run.done / run.seconds,
                              "nodes/s", note=f"{run.done} POST /files in {run.seconds:.2f} s"))
    say(f"  {run.done / run.seconds:,.0f}/s")
    res.mark_rss("after_creates")


def bench(args: argparse.Namespace, run_dir: Path) -> Results:
    res = Results()
    say("starting cairnd serve on 127.0.0.1:0, enrolling one device ...")
    with running_appliance(run_dir) as (appliance, server), appliance.client() as client:
        # `cairn join` made the user's keys and root folder; the tree is built under it
        root = expect(client.get("/me"), 200)["root_id"] or create(client, None, "dir")
        say(f"  {server.url}, appliance pid {appliance.pid}")
        transfer_phase(res, args, run_dir, appliance, root)
        if args.compare_clients:
            clients_phase(res, args, appliance, root)
        if not args.transfer_only:
            nodes = tree_phase(res, args, run_dir, client, root)
            creates_phase(res, args, appliance, client, root, nodes)
        server_peak = appliance.peak_rss_mib()
    res.figures.append(Figure("peak RSS, bench process", own_peak_rss_mib(), "MiB",
                              note=f"data set {args.size_mib:,} MiB, {args.nodes:,} nodes; "
                                   "must not grow with them"))
    res.figures.append(Figure("peak RSS, appliance", server_peak, "MiB",
                              note="VmHWM of the cairnd serve process at the end"))
    return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=PROJECT / "bench" / "out",
                        help="parent folder of the run's fresh folder (default: bench/out)")
    parser.add_argument("--size-mib", type=int, default=1024,
                        help="data uploaded and put, in MiB (4 MiB blocks; default 1024)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="uploads, puts and concurrent creates in flight (default 8)")
    parser.add_argument("--nodes", type=int, default=100_000,
                        help="nodes in the tree at the last /changes checkpoint "
                             "(default 100000)")
    parser.add_argument("--creates", type=int, default=2000,
                        help="POST /files for each single-create figure (default 2000)")
    parser.add_argument("--reps", type=int, default=50,
                        help="/changes fetches per checkpoint (default 50)")
    parser.add_argument("--phase-timeout", type=float, default=300.0,
                        help="seconds after which a phase stops early (default 300)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 256 MiB, 10000 nodes, 500 creates")
    parser.add_argument("--json", type=Path, default=PROJECT / "bench" / "out" / "api.json",
                        help="also write the results here (default bench/out/api.json)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder")
    parser.add_argument("--compare-clients", action="store_true",
                        help="also compare httpx.AsyncClient (trio) with httpx.Client in "
                             "worker threads for block PUT and GET, 4 and 8 in flight")
    parser.add_argument("--clients-size-mib", type=int, default=512,
                        help="data per client run of --compare-clients (default 512)")
    parser.add_argument("--transfer-only", action="store_true",
                        help="only dd, store put, block upload and download (no tree, no "
                             "creates)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.nodes, args.creates = 256, 10_000, 500
    if args.size_mib < 4 or args.concurrency < 1 or args.creates < 1 or args.reps < 2:
        parser.error("--size-mib must be >= 4, --concurrency and --creates >= 1, "
                     "--reps >= 2")
    if args.nodes < 100:
        parser.error("--nodes must be at least 100")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [BARE_SERVER]:
        bare_server_main(Path(argv[1]))
        return 0
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    args.dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="api-", dir=args.dir)).resolve()
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    say(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
        f"{fs.get('type', '?')} on {fs.get('device', '?')}; run folder {run_dir}")
    started = time.monotonic()
    try:
        result = bench(args, run_dir)
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    figures = result.figures
    say("")
    say(format_table(figures))
    say("")
    for f in figures:
        if f.note:
            say(f"  {f.name}: {f.note}")
    if result.client_table:
        say("")
        say(result.client_table)
        say("")
    say("  RSS (MiB) by phase: " + ", ".join(f"{k} {v:.0f}" for k, v in result.rss_mib.items()))
    for note in result.notes:
        say(f"  note: {note}")
    say(f"  total {time.monotonic() - started:.0f} s")
    payload = {
        "machine": info,
        "settings": {"size_mib": args.size_mib, "concurrency": args.concurrency,
                     "nodes": args.nodes, "creates": args.creates, "reps": args.reps,
                     "batch_size": BATCH_SIZE, "data_shards": DATA_SHARDS,
                     "parity_shards": PARITY_SHARDS, "disks": DISKS},
        "figures": [f.to_json() for f in figures],
        **result.extra,
        "rss_mib": {k: round(v, 1) for k, v in result.rss_mib.items()},
        "notes": result.notes,
        "seconds": round(time.monotonic() - started, 1),
        "kept": str(run_dir) if args.keep else None,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    missed = [f.name for f in figures if f.verdict == "MISS"]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
