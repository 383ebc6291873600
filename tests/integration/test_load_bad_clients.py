"""Load and bad clients (issue 14, deliverable 7): one real `cairnd serve` on 127.0.0.1,
attacked within bounds — thousands of idle connections, slowloris heads and bodies,
oversized heads, a device flooding past its rate limit, floods of bad tokens, strangers
sending huge bodies — while a well-behaved device (`GoodDevice`) keeps working: its
requests (GET /me, a small upload, its download read back) answer within LATENCY_P99_S at
the 99th percentile and LATENCY_MAX_S at worst, the appliance's RSS stays within
RSS_GROWTH_MIB of what it was before the attacks, and every upload it was acknowledged
reads back byte-exact at the end.

The appliance starts with a soft open-file limit of 1024 (its hard limit stays higher), as
services often do: serving 2,000 idle connections at once depends on it raising that limit.
Floods run in a child process (FLOOD_SCRIPT) so that the test process's GIL does not slow
the good device's measurements; the idle and slow connections, which mostly sleep, are
held by the test process itself. README "Limits" lists the limits and the figures.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from api_helpers import Device, add_user, create_file, download, enroll, make_root, upload
from cairnd_helpers import RunningAppliance, serving
from hypercorn.config import Config as HypercornConfig

from appliance.api.bodylimit import BODY_GRACE_S, MAX_HEAD_BYTES, MAX_HEADERS
from appliance.config import write_config
from appliance.home import init_home
from appliance.https import FD_RESERVE, MAX_CONNECTIONS, serve_https
from appliance.serve import KEEP_ALIVE_TIMEOUT_S, TLS_HANDSHAKE_TIMEOUT_S, bind_listening_socket

MiB = 1024 * 1024
LATENCY_P99_S = 1.0        # asserted; measured p99 under these attacks: see README "Limits"
LATENCY_MAX_S = 5.0
RSS_GROWTH_MIB = 128       # asserted over the RSS before any attack
RATE_PER_S, RATE_BURST = 100.0, 200   # the appliance's rate limit here (default: 500, 5000)
SERVER_SOFT_NOFILE = 1024  # the soft open-file limit the appliance starts with
ROUND_PAUSE_S = 0.1        # between the good device's rounds: it stays under RATE_PER_S
SLACK_S = 4.0              # for a deadline the appliance enforces, on a busy 2-core machine


# --- the appliance and the good device --------------------------------------------------------

def rss_mib(pid: int) -> float:
    """Resident memory of process PID, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def soft_open_file_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit for {pid}")


@dataclass
class Watch:
    """What the good device saw while an attack ran."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    peak_rss_mib: float = 0.0

    def p99(self, kind: str) -> float:
        values = sorted(self.latencies[kind])
        return values[min(len(values) - 1, int(len(values) * 0.99))]

    def summary(self) -> str:
        return ", ".join(f"{kind} n={len(v)} p50={sorted(v)[len(v) // 2] * 1000:.0f} ms "
                         f"p99={self.p99(kind) * 1000:.0f} ms max={max(v) * 1000:.0f} ms"
                         for kind, v in self.latencies.items() if v)


@dataclass
class GoodDevice:
    """A well-behaved device: each round reads /me, uploads a small new file and reads it
    back; what the appliance acknowledged is kept for the final check."""

    device: Device
    root: str
    pid: int
    baseline_rss_mib: float = 0.0
    stored: list[tuple[str, bytes]] = field(default_factory=list)
    watches: dict[str, Watch] = field(default_factory=dict)

    def round(self, watch: Watch) -> None:
        def timed(kind: str, call: Any, *args: Any) -> Any:
            started = time.monotonic()
            result = call(*args)
            watch.latencies.setdefault(kind, []).append(time.monotonic() - started)
            return result

        me = timed("me", self.device.get, "/me")
        assert me.status_code == 200, (me.status_code, me.text)
        data = os.urandom(20_000 + len(self.stored))
        created = timed("create", create_file, self.device, self.root, [data])
        timed("upload", upload, self.device, created["upload"], [data])
        node_id = created["node"]["id"]
        self.stored.append((node_id, data))
        assert timed("download", download, self.device, node_id) == data

    @contextlib.contextmanager
    def watched(self, name: str, *, min_rounds: int = 3,
                limit_s: float = 120.0) -> Iterator[Watch]:
        """Rounds in a thread while the block runs (at most LIMIT_S); then assert they all
        succeeded, at least MIN_ROUNDS of them, within the latency and memory bounds."""
        watch = self.watches[name] = Watch()
        done = threading.Event()

        def run() -> None:
            deadline = time.monotonic() + limit_s
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    self.round(watch)
                    watch.rounds += 1
                except Exception as exc:  # recorded, asserted on below
                    watch.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                watch.peak_rss_mib = max(watch.peak_rss_mib, rss_mib(self.pid))
                done.wait(ROUND_PAUSE_S)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield watch
        finally:
            done.set()
            thread.join(60)
        watch.peak_rss_mib = max(watch.peak_rss_mib, rss_mib(self.pid))
        print(f"{name}: {watch.rounds} rounds; {watch.summary()}; RSS peak "
              f"{watch.peak_rss_mib:.0f} MiB (baseline {self.baseline_rss_mib:.0f})")
        assert not thread.is_alive(), "the good device's round hung"
        assert not watch.failures, watch.failures[:5]
        assert watch.rounds >= min_rounds, (watch.rounds, watch.summary())
        for kind, values in watch.latencies.items():
            assert watch.p99(kind) < LATENCY_P99_S, (kind, watch.summary())
            assert max(values) < LATENCY_MAX_S, (kind, watch.summary())
        assert watch.peak_rss_mib < self.baseline_rss_mib + RSS_GROWTH_MIB, \
            (watch.peak_rss_mib, self.baseline_rss_mib)


@dataclass
class Target:
    server: RunningAppliance
    home: Path
    good: GoodDevice
    attacker_token: str

    @property
    def port(self) -> int:
        return self.server.port


@contextlib.contextmanager
def open_file_soft_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE set to SOFT for the block (children inherit it)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = MAX_CONNECTIONS + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below {needed}")
    if soft < needed:  # the test process holds thousands of sockets too
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    config = init_home(tmp_path_factory.mktemp("load") / "appliance", reserve_free_bytes=0,
                       listen="127.0.0.1:0")
    write_config(replace(config, rate_limit_per_s=RATE_PER_S, rate_limit_burst=RATE_BURST))
    with contextlib.ExitStack() as stack:
        with open_file_soft_limit(SERVER_SOFT_NOFILE):
            server = stack.enter_context(serving(config.home))
        server_limit = soft_open_file_limit(server.process.pid)
        certificate = config.tls_certificate
        good = enroll(server.url, certificate, add_user(config.home, "good"), "good")
        stack.callback(good.close)
        attacker = enroll(server.url, certificate, add_user(config.home, "mallory"), "flood")
        attacker.close()
        device = GoodDevice(good, make_root(good)["id"], server.process.pid)
        for _ in range(3):  # warm up: the baseline includes a few uploads and downloads
            device.round(Watch())
        device.baseline_rss_mib = rss_mib(server.process.pid)
        assert server_limit >= MAX_CONNECTIONS + FD_RESERVE, server_limit  # raised
        yield Target(server, config.home, device, attacker.token)
        assert server.stop() == 0
        assert "Traceback" not in server.stderr(), server.stderr()[-5000:]


# --- raw clients ------------------------------------------------------------------------------

def client_context() -> ssl.SSLContext:
    """An attacker's TLS: no verification, HTTP/1.1."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def tls_socket(port: int, timeout: float = 10.0) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context().wrap_socket(raw)


def partial_client_hello(port: int) -> socket.socket:
    """A TCP connection that sent half a TLS ClientHello and then nothing."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(hello[: len(hello) // 2])
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the appliance closed SOCK (read without blocking; data counts as open)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:  # reset, or an EOF inside TLS
        return True
    finally:
        sock.setblocking(True)


def wait_closed(sockets: dict[int, tuple[socket.socket, float]],
                limit_s: float) -> dict[int, float]:
    """Poll SOCKETS (fd -> (socket, opened at)) until the appliance closed each or LIMIT_S
    passed; how long each stayed open."""
    poller = select.poll()
    for fd in sockets:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    lived: dict[int, float] = {}
    deadline = time.monotonic() + limit_s
    while len(lived) < len(sockets) and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            sock, opened = sockets[fd]
            if fd not in lived and closed_by_peer(sock):
                lived[fd] = time.monotonic() - opened
                poller.unregister(fd)
    return lived


def exchange_raw(port: int, data: bytes, limit_s: float = 15.0) -> tuple[bytes, float]:
    """Send DATA on a new TLS connection and read until the appliance closes it; the
    answer's first line (b"" if none came) and how long it took."""
    sock = tls_socket(port, timeout=limit_s)
    started = time.monotonic()
    got = b""
    try:
        with contextlib.suppress(OSError):  # the appliance may close before all is sent
            sock.sendall(data)
        with contextlib.suppress(OSError):
            while len(got) < 65536 and time.monotonic() - started < limit_s:
                piece = sock.recv(65536)
                if not piece:
                    break
                got += piece
    finally:
        sock.close()
    return got.split(b"\r\n", 1)[0], time.monotonic() - started


# --- idle connections -------------------------------------------------------------------------

def test_thousands_of_idle_connections(target: Target) -> None:
    """1,000 silent TCP connections, 500 TLS connections idle after their handshake and
    500 stuck halfway through it: 2,000 at once (over the appliance's starting soft
    open-file limit), while the good device works; then the appliance closes them all, the
    handshaken ones after the keep-alive timeout, the others after the handshake timeout."""
    port = target.port
    held: dict[int, tuple[socket.socket, float]] = {}
    kinds: dict[int, str] = {}

    def hold(sock: socket.socket, kind: str) -> None:
        held[sock.fileno()] = (sock, time.monotonic())
        kinds[sock.fileno()] = kind

    try:
        with target.good.watched("idle connections"):
            for _ in range(1000):
                hold(socket.create_connection(("127.0.0.1", port), timeout=10), "tcp")
            for _ in range(500):
                hold(tls_socket(port), "tls")
            for _ in range(500):
                hold(partial_client_hello(port), "half-handshake")
            time.sleep(1)  # all 2,000 held while the good device goes on
            now = time.monotonic()
            closed_early = [kinds[fd] for fd, (sock, opened) in held.items()
                            if now - opened < KEEP_ALIVE_TIMEOUT_S - 1
                            and closed_by_peer(sock)]
            assert not closed_early, closed_early[:10]
        lived = wait_closed(held, TLS_HANDSHAKE_TIMEOUT_S + 2 * SLACK_S)
    finally:
        for sock, _ in held.values():
            sock.close()
    assert len(lived) == len(held), f"{len(held) - len(lived)} connections still open"
    by_kind = {kind: max(lived[fd] for fd in lived if kinds[fd] == kind)
               for kind in ("tcp", "tls", "half-handshake")}
    print("longest held open, s:", {k: round(v, 1) for k, v in by_kind.items()})
    assert by_kind["tls"] < KEEP_ALIVE_TIMEOUT_S + SLACK_S
    assert by_kind["tcp"] < TLS_HANDSHAKE_TIMEOUT_S + SLACK_S
    assert by_kind["half-handshake"] < TLS_HANDSHAKE_TIMEOUT_S + SLACK_S


async def test_connections_beyond_the_cap_wait_for_a_free_slot(
        certificate: tuple[Path, Path]) -> None:
    """serve_https with a cap of 3: a fourth connection is not served (its handshake does not
    complete) until one of the three closes; then it is."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Lifespan only: the connections here never send a request."""
        while scope["type"] == "lifespan":
            kind = (await receive())["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return

    config = HypercornConfig()
    config.certfile, config.keyfile = map(str, certificate)
    config.accesslog = None
    sock = bind_listening_socket("127.0.0.1", 0)
    port = int(sock.getsockname()[1])
    stop = trio.Event()

    def clients() -> None:
        first = [tls_socket(port) for _ in range(3)]
        with pytest.raises((TimeoutError, ssl.SSLError)):
            tls_socket(port, timeout=1.5).close()   # queued by the kernel, never accepted
        first.pop().close()
        late = tls_socket(port, timeout=5)          # a slot is free: served
        late.close()
        for sock in first:
            sock.close()

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_https(
            app, config, sock, shutdown_trigger=stop.wait, task_status=task_status,
            max_connections=3))
        with trio.fail_after(30):
            await trio.to_thread.run_sync(clients)
        stop.set()


# --- slow clients -----------------------------------------------------------------------------

@dataclass
class Dribbler:
    """Connections that each send a prefix at once and then their bytes one at a time, a
    byte per tick, from one thread; records when the appliance answered or closed each
    (counted from the start) and the first line of its answer (b"" for none)."""

    port: int
    payloads: list[tuple[bytes, bytes]]   # (sent at once, dribbled)
    tick_s: float
    sockets: list[ssl.SSLSocket] = field(default_factory=list)
    answers: dict[int, bytes] = field(default_factory=dict)
    lived: dict[int, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, limit_s: float) -> None:
        started = time.monotonic()
        self.sockets = [tls_socket(self.port) for _ in self.payloads]
        for sock, (prefix, _) in zip(self.sockets, self.payloads, strict=True):
            sock.sendall(prefix)
        sent = [0] * len(self.sockets)
        try:
            while (len(self.lived) < len(self.sockets) and not self.done.is_set()
                   and time.monotonic() - started < limit_s):
                for i, sock in enumerate(self.sockets):
                    if i not in self.lived:
                        answer = self._answer(sock)
                        if answer is None and sent[i] < len(self.payloads[i][1]):
                            try:
                                sock.sendall(self.payloads[i][1][sent[i]:sent[i] + 1])
                                sent[i] += 1
                            except OSError:
                                answer = self._answer(sock) or b""
                        if answer is not None:
                            self.answers[i] = answer.split(b"\r\n", 1)[0]
                            self.lived[i] = time.monotonic() - started
                time.sleep(self.tick_s)
        finally:
            for sock in self.sockets:
                sock.close()

    @staticmethod
    def _answer(sock: ssl.SSLSocket) -> bytes | None:
        """What the appliance sent (b"": it closed), or None if nothing yet."""
        sock.setblocking(False)
        try:
            return sock.recv(4096)
        except (ssl.SSLWantReadError, BlockingIOError):
            return None
        except OSError:
            return b""
        finally:
            sock.setblocking(True)

    @contextlib.contextmanager
    def running(self, limit_s: float) -> Iterator[Dribbler]:
        thread = threading.Thread(target=self.run, args=(limit_s,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            thread.join(limit_s + 30)
            self.done.set()


def slow_body_payload(token: str = "not-a-token", size: int = 4000) -> tuple[bytes, bytes]:
    """(head, body) of a POST /files whose body is to be dribbled."""
    body = b'{"parent": null, "kind": "dir", "metadata": "' + b"A" * size + b'"}'
    head = (b"POST /files HTTP/1.1\r\nHost: cairn\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head, body


def test_slowloris_heads_are_cut_at_the_keep_alive_timeout(target: Target) -> None:
    """100 connections dribbling a request head a byte every 0.1 s: each is closed once
    KEEP_ALIVE_TIMEOUT_S has passed without a complete head; the good device goes on."""
    head = b"GET /me HTTP/1.1\r\nHost: cairn\r\nX-Slow: " + b"a" * 10_000
    dribbler = Dribbler(target.port, [(b"", head)] * 100, 0.1)
    with target.good.watched("slowloris heads"), dribbler.running(limit_s=30):
        time.sleep(KEEP_ALIVE_TIMEOUT_S + SLACK_S)
    assert len(dribbler.lived) == 100, dribbler.lived
    assert max(dribbler.lived.values()) < KEEP_ALIVE_TIMEOUT_S + SLACK_S + 2
    assert min(dribbler.lived.values()) > KEEP_ALIVE_TIMEOUT_S - 1


def test_slowloris_bodies_do_not_hold_up_others(target: Target) -> None:
    """50 connections dribbling request bodies a byte every 0.2 s, for a while: the good
    device goes on meanwhile. (That they are cut off: the next, slow test.)"""
    dribbler = Dribbler(target.port, [slow_body_payload()] * 50, 0.2)
    with target.good.watched("slowloris bodies"), dribbler.running(limit_s=60):
        time.sleep(8)
        assert not dribbler.lived, "cut off before the grace period"
        dribbler.done.set()


@pytest.mark.slow
def test_slow_and_stalled_bodies_are_cut_off(target: Target) -> None:
    """A body dribbled a byte a second, and one that stops after its head, from a stranger
    and from a device: each is answered 408 and closed after about BODY_GRACE_S."""
    payloads = [slow_body_payload(), slow_body_payload(target.attacker_token)]
    stalled = [tls_socket(target.port) for _ in payloads]
    for sock, (head, _) in zip(stalled, payloads, strict=True):
        sock.sendall(head)
    opened = time.monotonic()
    dribbler = Dribbler(target.port, [p for p in payloads for _ in range(5)], 1.0)
    with target.good.watched("slow bodies cut"), dribbler.running(limit_s=BODY_GRACE_S + 30):
        pass
    stall_answers = [exchange_stalled(sock) for sock in stalled]
    assert len(dribbler.lived) == 10, dribbler.lived
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in dribbler.answers.values()), \
        dribbler.answers
    assert min(dribbler.lived.values()) > BODY_GRACE_S - 1
    assert max(dribbler.lived.values()) < BODY_GRACE_S + 2 * SLACK_S
    for answer in stall_answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - opened < BODY_GRACE_S + 3 * SLACK_S + 10


def exchange_stalled(sock: ssl.SSLSocket) -> bytes:
    """The first line of what the appliance answers on SOCK (it was sent a head only)."""
    sock.settimeout(BODY_GRACE_S)
    try:
        return sock.recv(4096).split(b"\r\n", 1)[0]
    finally:
        sock.close()


# --- oversized heads --------------------------------------------------------------------------

HEADS = {
    "one 100 KiB header": b"GET /me HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    "one 1 MiB header": b"GET /me HTTP/1.1\r\nHost: c\r\nX-Big: " + b"a" * MiB + b"\r\n\r\n",
    "3,000 headers": b"GET /me HTTP/1.1\r\nHost: c\r\n"
                     + b"".join(b"X-%d: a\r\n" % i for i in range(3000)) + b"\r\n",
    f"{MAX_HEADERS + 20} small headers": b"GET /me HTTP/1.1\r\nHost: c\r\n"
                                         + b"a: b\r\n" * (MAX_HEADERS + 20) + b"\r\n",
    "a 100 KiB URL": b"GET /files/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: c\r\n\r\n",
    "a URL just over the limit": b"GET /files/" + b"a" * MAX_HEAD_BYTES
                                 + b" HTTP/1.1\r\nHost: c\r\n\r\n",
    "2 MiB with no line end": b"G" * (2 * MiB),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_oversized_heads_are_refused(target: Target, name: str) -> None:
    """Answered 431 at once (or, for a head that is still being sent when the appliance
    answers, closed at once), never served; the good device goes on."""
    with target.good.watched(f"head: {name}", min_rounds=1):
        status, took = exchange_raw(target.port, HEADS[name])
    assert status in (b"HTTP/1.1 431 ", b""), status
    assert took < KEEP_ALIVE_TIMEOUT_S - 1, took  # refused, not left to time out


# --- floods -----------------------------------------------------------------------------------

# A child process: CONNS threads, each on a keep-alive connection, send GET /me for SECONDS
# with an Authorization header per MODE ("token:T", "random", "malformed"); prints the count
# of each status (and of each exception) and the largest Retry-After seen, as JSON.
FLOOD_SCRIPT = r'''
import base64, collections, http.client, json, os, ssl, sys, threading, time
port, mode, seconds, conns = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
MALFORMED = ["Basic Zm9vOmJhcg==", "Bearer", "Bearer   ", "bearer \x7f\x01", "x" * 4000,
             "Bearer " + "A" * 8000, "Token abc", "Bearer a b c", ""]
counts, lock, retry_after = collections.Counter(), threading.Lock(), [0]

def authorization(i):
    if mode.startswith("token:"):
        return "Bearer " + mode[6:]
    if mode == "random":
        return "Bearer cairn_dev_" + base64.urlsafe_b64encode(os.urandom(32)).decode()
    return MALFORMED[i % len(MALFORMED)]

def run():
    end, connection, i = time.monotonic() + seconds, None, 0
    while time.monotonic() < end:
        i += 1
        try:
            if connection is None:
                connection = http.client.HTTPSConnection("127.0.0.1", port, context=context,
                                                         timeout=15)
            connection.request("GET", "/me", headers={"Authorization": authorization(i)})
            response = connection.getresponse()
            response.read()
            with lock:
                counts[str(response.status)] += 1
                retry_after[0] = max(retry_after[0], int(response.getheader("retry-after") or 0))
            if response.getheader("connection", "") == "close":
                connection.close()
                connection = None
        except Exception as exc:
            with lock:
                counts[type(exc).__name__] += 1
            connection = None

threads = [threading.Thread(target=run) for _ in range(conns)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"counts": counts, "retry_after": retry_after[0]}))
'''


def flood(target: Target, mode: str, seconds: float = 6.0, conns: int = 16) -> dict[str, Any]:
    """Run FLOOD_SCRIPT against the appliance while the good device works; its report."""
    with target.good.watched(f"flood {mode[:12]}"):
        result = subprocess.run(
            [sys.executable, "-c", FLOOD_SCRIPT, str(target.port), mode, str(seconds),
             str(conns)], capture_output=True, text=True, timeout=seconds + 60, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    print(f"flood {mode[:12]}: {report}")
    return report


def test_a_device_flooding_past_its_rate_limit(target: Target) -> None:
    report = flood(target, "token:" + target.attacker_token)
    counts = report["counts"]
    assert set(counts) <= {"200", "429"}, counts
    assert counts.get("429", 0) > counts.get("200", 0) > 0, counts
    # The flooder got at most its burst plus its rate over the flood (with slack).
    assert counts["200"] <= RATE_BURST + RATE_PER_S * 8, counts
    assert report["retry_after"] >= 1


@pytest.mark.parametrize("mode", ["random", "malformed"])
def test_floods_of_bad_tokens(target: Target, mode: str) -> None:
    counts = flood(target, mode)["counts"]
    assert set(counts) == {"401"}, counts
    assert counts["401"] > 500, counts


def test_strangers_cannot_make_the_appliance_read_large_bodies(target: Target) -> None:
    """Eight bad-token requests at once, each with a 29 MiB JSON body (POST /batch/files
    takes up to 32 MiB): answered 401 before the appliance reads past 64 KiB, so its
    memory stays flat (the whole bodies parsed took it from 74 to 633 MiB)."""
    body = b'{"operations": [' + b",".join([b'{"op": "x", "data": "' + b"A" * 1000
                                             + b'"}'] * 30_000) + b"]}"
    statuses: list[int | str] = []

    def send() -> None:
        try:
            with httpx.Client(verify=False, timeout=60) as client:
                statuses.append(client.post(
                    f"{target.server.url}/batch/files", content=body,
                    headers={"Authorization": "Bearer not-a-token",
                             "Content-Type": "application/json"}).status_code)
        except httpx.TransportError as exc:   # closed while still sending: not read either
            statuses.append(type(exc).__name__)

    with target.good.watched("large bodies from strangers", min_rounds=1):
        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert len(statuses) == 8 and 401 in statuses, statuses
    assert all(status in (401, "WriteError", "RemoteProtocolError", "ReadError")
               for status in statuses), statuses


def read_back(device: Device, node_id: str) -> bytes:
    """`download`, waiting out the device's own rate limit (the check reads hundreds of
    files as fast as it can)."""
    for _ in range(20):
        try:
            return download(device, node_id)
        except AssertionError as exc:
            if "rate_limited" not in str(exc):
                raise
            time.sleep(0.5)
    raise AssertionError(f"{node_id}: rate-limited 20 times")


# --- nothing lost -----------------------------------------------------------------------------

def test_every_acknowledged_upload_reads_back_byte_exact(target: Target) -> None:
    """Last in this file: everything the good device was told was stored, through every
    attack above, reads back byte-exact."""
    good = target.good
    assert len(good.stored) > 20, len(good.stored)
    for node_id, data in good.stored:
        assert read_back(good.device, node_id) == data
    peaks = {name: round(watch.peak_rss_mib) for name, watch in good.watches.items()}
    print(f"baseline RSS {good.baseline_rss_mib:.0f} MiB; peaks {peaks}")
