"""A LAN of three hosts — the appliance, device A and device B — in network namespaces, with
the appliance's link optionally shaped by `tc ... tbf`: the setup of the LAN-peers tests and
of bench/peers.py (which imports this file, so the benchmark and the test measure the same
thing)::

    cairn-br-SUFFIX:   br0 ── app0, dva0, dvb0        (a bridge, nothing else)
    cairn-app-SUFFIX:  eth0 10.79.0.1/24   `cairnd serve --listen 10.79.0.1:0`
    cairn-dva-SUFFIX:  eth0 10.79.0.2/24   device A (`cairn --home A-HOME ...`)
    cairn-dvb-SUFFIX:  eth0 10.79.0.3/24   device B (any number of homes: one per run)

`three_hosts(base)` builds it (netns_helpers.lan), makes and serves an appliance home in
BASE, and always ends every process it or its devices started (by their Popen, never by
name) and deletes the namespaces, even when the block fails. `shape(...)` puts a token
bucket on BOTH directions of a host's link: the host's eth0 egress (what it sends) and its
bridge port's egress (what it receives) — a 100 Mbit/s appliance behind a fast LAN.

Every command runs inside its host's namespace with `ip netns exec` (which execs it: a
Popen's pid is the command's own, so its /proc figures are the agent's). Agents get
CAIRN_DISCOVERY=on — only the namespaces' interfaces exist where they run — and each device
home is its own CAIRN_HOME (`--home`).

Nothing here imports pytest or the other test helpers: bench/peers.py runs it as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import blake3
from netns_helpers import Lan, in_netns, lan, netns_available

from appliance.config import ApplianceConfig
from appliance.home import init_home

CAIRND = (sys.executable, "-m", "appliance.cli")
CAIRN = (sys.executable, "-m", "agent.cli")
PASSPHRASE = "correct horse battery staple"
APPLIANCE_ADDRESS = "10.79.0.1"
WIRES = (
    ("br0", "app", "eth0", APPLIANCE_ADDRESS),
    ("br0", "dva", "eth0", "10.79.0.2"),
    ("br0", "dvb", "eth0", "10.79.0.3"),
)
SERVE_LINE = re.compile(
    r"^cairnd: serving (?P<url>https://(?P<host>[^ ]+):(?P<port>\d+)) "
    r"\(appliance (?P<appliance_id>[^,]+), certificate sha256 (?P<fingerprint>[0-9a-f]{64})\)$")
# tbf needs a bucket of at least one (GSO-split) packet; 128 KiB is ~10 ms at 100 Mbit/s,
# and 50 ms of queue keeps a TCP stream at the rate without drops that would slow it more.
TBF_BURST = "128kb"
TBF_LATENCY = "50ms"


class LanError(Exception):
    """The LAN or a process on it did not do what the setup needs (a command failed, a bounded
    wait ran out)."""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CAIRN_HOME", "CAIRN_PASSPHRASE", "CAIRN_APPLIANCE_HOME")}
    env["CAIRN_DISCOVERY"] = "on"   # inside a namespace the test made: its LAN only
    env.update(extra)
    return env


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --- shaping ---------------------------------------------------------------------------------

def shape(net: Lan, host: str, rate: str = "100mbit") -> None:
    """Limit HOST's link to RATE both ways: a tbf on its eth0 (what HOST sends) and on its
    bridge port HOST+'0' (what the bridge sends to HOST)."""
    for netns, device in ((net.hosts[host].netns, "eth0"), (net.bridge_netns, f"{host}0")):
        _tc(netns, "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
            "burst", TBF_BURST, "latency", TBF_LATENCY)


def unshape(net: Lan, host: str) -> None:
    for netns, device in ((net.hosts[host].netns, "eth0"), (net.bridge_netns, f"{host}0")):
        _tc(netns, "qdisc", "del", "dev", device, "root")


def shaping(net: Lan, host: str) -> list[str]:
    """The root qdiscs on HOST's two ends, as `tc qdisc show` prints them."""
    shown = []
    for netns, device in ((net.hosts[host].netns, "eth0"), (net.bridge_netns, f"{host}0")):
        shown.append(_tc(netns, "qdisc", "show", "dev", device).strip())
    return shown


def _tc(netns: str, *args: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True,
                          text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise LanError(f"tc {' '.join(args)} in {netns}: {done.stderr.strip()}")
    return done.stdout


# --- processes -------------------------------------------------------------------------------

@dataclass
class Started:
    """A process started on the LAN, its output in files (a pipe could fill)."""

    process: subprocess.Popen[str]
    log: Path
    started: float = field(default_factory=time.perf_counter)

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after TIMEOUT; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(timeout=timeout)


@dataclass
class Processes:
    """Every process the setup started, so that all of them end with it."""

    started: list[Started] = field(default_factory=list)

    def spawn(self, argv: list[str], log: Path, env: dict[str, str]) -> Started:
        with open(log, "ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, text=True)
        run = Started(process, log)
        self.started.append(run)
        return run

    def end_all(self) -> None:
        for run in reversed(self.started):
            if run.process.poll() is None:
                run.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(timeout=10)


# --- the devices -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Finished:
    """One `cairn` command run to completion: its output, wall clock, and its own CPU and
    peak RSS (wait4: this process only)."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    peak_rss_mib: float


@dataclass
class Device:
    """One agent home on one of the device hosts (several homes may share a host)."""

    name: str
    netns: str
    address: str
    home: Path
    processes: Processes

    def argv(self, *args: str | Path) -> list[str]:
        return in_netns(self.netns, *CAIRN, "--home", self.home, *args)

    def run(self, *args: str | Path, timeout: float = 300) -> Finished:
        """`cairn --home HOME ARGS...` inside the host's namespace, to completion (killed
        after TIMEOUT)."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.perf_counter()
            process = subprocess.Popen(self.argv(*args), stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, text=True,
                                       env=_env(CAIRN_PASSPHRASE=PASSPHRASE))
            deadline = time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    process.kill()
                    os.wait4(process.pid, 0)
                    process.returncode = -signal.SIGKILL
                    raise LanError(f"{self.name}: cairn {' '.join(map(str, args))} still "
                                   f"running after {timeout:.0f} s; killed")
                time.sleep(0.01)
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            return Finished(process.returncode, out.read(), err.read(), seconds,
                            usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)

    def ok(self, *args: str | Path, timeout: float = 300) -> Finished:
        """`run`, which must exit 0 without a traceback."""
        done = self.run(*args, timeout=timeout)
        if done.returncode != 0 or "Traceback" in done.stderr:
            raise LanError(f"{self.name}: cairn {' '.join(map(str, args))} exited "
                           f"{done.returncode}:\n{_tail(done.stderr)}")
        return done

    def start(self, *args: str | Path, log_name: str = "agent.log") -> Started:
        """`cairn --home HOME ARGS...` left running (`cairn sync DIR`), its output in
        HOME/LOG_NAME; ended with the LAN at the latest."""
        self.home.mkdir(parents=True, exist_ok=True)
        return self.processes.spawn(self.argv(*args), self.home / log_name, _env())


# --- the appliance ---------------------------------------------------------------------------

@dataclass
class ThreeHosts:
    """The running LAN: the bridge and hosts, the appliance (home, server) and devices."""

    net: Lan
    base: Path
    config: ApplianceConfig
    server: Started
    url: str
    appliance_id: str
    processes: Processes

    @property
    def home(self) -> Path:
        return self.config.home

    def netns(self, host: str) -> str:
        return self.net.hosts[host].netns

    def cairnd(self, *args: str, timeout: float = 120) -> str:
        """`cairnd ARGS... --home HOME` inside the appliance's namespace; its stdout."""
        done = subprocess.run(in_netns(self.netns("app"), *CAIRND, *args, "--home",
                                       self.home),
                              capture_output=True, text=True, timeout=timeout, check=False,
                              env=_env())
        if done.returncode != 0:
            raise LanError(f"cairnd {' '.join(args)} exited {done.returncode}: "
                           f"{_tail(done.stderr)}")
        return done.stdout

    def add_user(self, name: str) -> str:
        """`cairnd user add NAME`: the first enrollment code."""
        return self.cairnd("user", "add", name).strip().splitlines()[-1]

    def new_code(self, name: str) -> str:
        """`cairnd user code NAME`: a code for another device of NAME."""
        return self.cairnd("user", "code", name).strip().splitlines()[-1]

    def stats(self) -> dict[str, Any]:
        """The appliance's own counters (`cairnd stats --json`, read while serve runs)."""
        parsed: dict[str, Any] = json.loads(self.cairnd("stats", "--json"))
        return parsed

    def device(self, host: str, name: str, code: str) -> Device:
        """A new device home BASE/NAME on HOST ('dva' or 'dvb'), joined with CODE."""
        found = Device(name=name, netns=self.netns(host),
                       address=self.net.hosts[host].addresses["eth0"],
                       home=self.base / name, processes=self.processes)
        found.ok("join", code, "--url", self.url, "--name", name, timeout=120)
        return found

    def server_log(self) -> str:
        return self.server.text()


def _serve(netns: str, home: Path, address: str, processes: Processes, log: Path,
           timeout: float = 60) -> tuple[Started, re.Match[str]]:
    """`cairnd serve --listen ADDRESS:0` inside NETNS, once its serving line is out (stdout
    is a pipe read for that line only, then left alone: serve prints nothing more there; the
    log is its stderr)."""
    err: IO[str]
    with open(log, "a") as err:
        process = subprocess.Popen(
            in_netns(netns, *CAIRND, "serve", "--home", home, "--listen", f"{address}:0"),
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            env=_env())
    run = Started(process, log)
    processes.started.append(run)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline().rstrip("\n") if ready else ""
    match = SERVE_LINE.match(line)
    if match is None:
        raise LanError(f"cairnd serve did not start: {line!r}\n{_tail(run.text())}")
    return run, match


@contextlib.contextmanager
def three_hosts(base: Path, *, wires: Sequence[tuple[str, str, str, str]] = WIRES,
                disks: int = 6, data_shards: int = 4, parity_shards: int = 2
                ) -> Iterator[ThreeHosts]:
    """The LAN of the module docstring with a fresh appliance home in BASE/appliance served
    on 10.79.0.1; every process ended and the namespaces deleted at the end, whatever
    happened. Raises LanError when namespaces cannot be made here (not root)."""
    reason = netns_available()
    if reason is not None:
        raise LanError(reason)
    base.mkdir(parents=True, exist_ok=True)
    processes = Processes()
    server: Started | None = None
    with lan(wires) as net:
        try:
            config = init_home(base / "appliance", disks=disks, data_shards=data_shards,
                               parity_shards=parity_shards, reserve_free_bytes=0,
                               listen="127.0.0.1:0")   # serve says where it listens
            server, match = _serve(net.hosts["app"].netns, config.home, APPLIANCE_ADDRESS,
                                   processes, base / "cairnd.log")
            yield ThreeHosts(net=net, base=base, config=config, server=server,
                             url=match["url"], appliance_id=match["appliance_id"],
                             processes=processes)
        finally:
            # The agents are killed; the appliance is asked to stop first (it then stops
            # cleanly, which a test may check in its log), and killed if it lingers.
            for run in processes.started:
                if run is not server and run.running():
                    run.process.kill()
            if server is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.stop(timeout=20)
            processes.end_all()


def wait_for_file(path: Path, size: int, deadline: float, check: Started | None = None,
                  poll_s: float = 0.05) -> float:
    """perf_counter() when PATH first exists with SIZE bytes (a synced file appears whole:
    it is renamed into place); raises LanError past DEADLINE (perf_counter), or when CHECK
    exited."""
    while True:
        with contextlib.suppress(OSError):
            if path.stat().st_size == size:
                return time.perf_counter()
        if check is not None and not check.running():
            raise LanError(f"{check.process.args!r} exited {check.process.returncode} before "
                           f"{path.name} arrived:\n{_tail(check.text())}")
        if time.perf_counter() > deadline:
            raise LanError(f"{path} did not arrive with {size} bytes in time")
        time.sleep(poll_s)


def cpu_seconds(pid: int) -> float:
    """utime + stime of PID so far (/proc/PID/stat); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """PID's peak resident memory (VmHWM); 0 once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def settle(pids: Sequence[int], window_s: float = 2.0, cpu_s: float = 0.05,
           timeout_s: float = 120.0) -> float:
    """Wait until each of PIDS used at most CPU_S over one WINDOW_S; the seconds waited."""
    started = time.monotonic()
    while True:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(window_s)
        used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
        if max(used, default=0.0) <= cpu_s:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise LanError(f"processes {list(pids)} did not settle in {timeout_s:.0f} s "
                           f"(CPU-s in the last {window_s:g} s: {used})")


# --- the link's raw rate ---------------------------------------------------------------------

TCP_PROBE_PORT = 5201
_TCP_SENDER = """
import socket, sys
address, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.create_server((address, port)) as server:
    print("ready", flush=True)
    server.settimeout(60)
    connection, _ = server.accept()
    with connection:
        chunk = bytes(1 << 20)
        for _ in range(size >> 20):
            connection.sendall(chunk)
"""
_TCP_RECEIVER = """
import socket, sys, time
address, port = sys.argv[1], int(sys.argv[2])
started = time.perf_counter()
received = 0
with socket.create_connection((address, port), timeout=60) as connection:
    while data := connection.recv(1 << 20):
        received += len(data)
print(received, time.perf_counter() - started)
"""


def tcp_rate(net: ThreeHosts, sender: str = "app", receiver: str = "dvb",
             size: int = 32 << 20) -> float:
    """Bytes per second of one plain TCP stream of SIZE bytes from SENDER to RECEIVER (no TLS,
    no agent): the link's own rate, to judge the agents' by."""
    address = net.net.hosts[sender].addresses["eth0"]
    run = net.processes.spawn(
        in_netns(net.netns(sender), sys.executable, "-c", _TCP_SENDER, address,
                 str(TCP_PROBE_PORT), str(size)),
        net.base / f"tcp-probe-{len(net.processes.started)}.log", _env())
    deadline = time.monotonic() + 30
    while "ready" not in run.text():
        if not run.running() or time.monotonic() > deadline:
            raise LanError(f"the TCP probe's sender did not start:\n{_tail(run.text())}")
        time.sleep(0.02)
    done = subprocess.run(in_netns(net.netns(receiver), sys.executable, "-c", _TCP_RECEIVER,
                                   address, str(TCP_PROBE_PORT)),
                          capture_output=True, text=True, timeout=120, check=False)
    run.stop(timeout=10)
    received, seconds = done.stdout.split() if done.returncode == 0 else ("0", "0")
    if int(received) != size:
        raise LanError(f"the TCP probe received {received} of {size} bytes: {done.stderr}")
    return size / float(seconds)


# --- files -----------------------------------------------------------------------------------

def write_random(path: Path, size: int) -> bytes:
    """SIZE bytes of fresh randomness at PATH (every block distinct), fsynced; its BLAKE3."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(16 << 20, left))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.digest()


def file_hash(path: Path) -> bytes:
    """PATH's BLAKE3."""
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return digest.digest()


# --- the Show scenario: B fetches a file A has, without peers and with them ------------------

MIB = 1 << 20
BLOCK_SIZE = 4 * MIB
PROBE_SIZE = 64 * MIB
REMOTE_FOLDER = "/lan"
NO_PEERS = "--no-peers"
RUNS = ("get alone", "get peers", "sync alone", "sync peers")


@dataclass(frozen=True)
class FetchRun:
    """One of B's fetches of the file: wall clock, what the appliance served meanwhile (its
    own counters), and the agents' CPU and memory."""

    label: str
    seconds: float
    served_blocks: int
    served_bytes: int
    b_cpu_seconds: float          # B's agent process, start to the file being there
    b_peak_rss_mib: float
    a_cpu_seconds: float          # A's running `cairn sync` over the same span


@dataclass
class Scenario:
    """What `fetch_scenario` measured."""

    size: int
    rate: str
    upload_seconds: float = 0.0
    tcp_bytes_per_s: float = 0.0   # one plain TCP stream, appliance -> B
    probe_seconds: float = 0.0     # B's `cairn get --no-peers` of PROBE_SIZE
    runs: dict[str, FetchRun] = field(default_factory=dict)
    a_peak_rss_mib: float = 0.0

    @property
    def blocks(self) -> int:
        return -(-self.size // BLOCK_SIZE)

    @property
    def link_bytes_per_s(self) -> float:
        return PROBE_SIZE / self.probe_seconds

    def speedup(self, kind: str) -> float:
        """KIND ('get' or 'sync') without peers / with peers, in wall clock."""
        return self.runs[f"{kind} alone"].seconds / self.runs[f"{kind} peers"].seconds


def fetch_scenario(net: ThreeHosts, work: Path, size: int, *, rate: str = "100mbit",
                   user_added: Callable[[str], None] = lambda name: None,
                   note: Callable[[str], None] = lambda text: None,
                   timeout: float = 900) -> Scenario:
    """Issue 15's first Show, on NET, with files in WORK:

    1. device A (user alice) has a SIZE-byte random file in its synced folder: `cairn sync
       DIR --remote /lan --once` uploads it on the unshaped link, then `cairn sync DIR` keeps
       running (its peer service with it) until the LAN ends; a 64 MiB probe file is put too;
    2. the appliance's link is shaped to RATE both ways (after the upload: at 100 Mbit/s
       1 GiB is ~90 s that measure nothing), and its real rate is measured twice: one plain
       TCP stream of 32 MiB from the appliance's host to B's, and B's `cairn get
       --no-peers` of the probe (which includes the agent's start, ~1 s);
    3. B, each time in a fresh home joined for the run: `cairn get --no-peers`, `cairn get`,
       `cairn sync DIR --remote /lan --no-peers`, `cairn sync DIR --remote /lan` — each until
       the file is there, checked byte-exact (BLAKE3) and deleted; the appliance's `cairnd
       stats` read before and after each.

    USER_ADDED runs once alice exists (a test stores cheap keys there); NOTE hears one line
    per figure as it is measured. Raises LanError (or AssertionError on wrong bytes)."""
    result = Scenario(size=size, rate=rate)
    code = net.add_user("alice")
    user_added("alice")
    a = net.device("dva", "a", code)

    folder_a = work / "a-folder"
    digest = write_random(folder_a / "big.bin", size)
    probe = work / "probe.bin"
    write_random(probe, PROBE_SIZE)
    a.ok("put", probe, "/probe.bin")
    probe.unlink()
    uploaded = a.ok("sync", folder_a, "--remote", REMOTE_FOLDER, "--once", timeout=timeout)
    result.upload_seconds = uploaded.seconds
    note(f"A's upload of {size / MIB:.0f} MiB (unshaped link): {uploaded.seconds:.1f} s")
    sync_a = a.start("sync", folder_a, "--remote", REMOTE_FOLDER, "-v", log_name="sync.log")

    shape(net.net, "app", rate)
    if not all("tbf" in line for line in shaping(net.net, "app")):
        raise LanError(f"the appliance's link is not shaped: {shaping(net.net, 'app')}")
    result.tcp_bytes_per_s = tcp_rate(net)
    note(f"link ({rate} tbf both ways): one TCP stream {result.tcp_bytes_per_s / 1e6:.1f} MB/s "
         f"({result.tcp_bytes_per_s * 8 / 1e6:.0f} Mbit/s)")
    probe_out = work / "probe-out.bin"
    probed = net.device("dvb", "b-probe", net.new_code("alice")).ok(
        "get", NO_PEERS, "/probe.bin", probe_out, timeout=timeout)
    probe_out.unlink()
    result.probe_seconds = probed.seconds
    note(f"link: `cairn get --no-peers` of 64 MiB in "
         f"{probed.seconds:.2f} s = {result.link_bytes_per_s / 1e6:.1f} MB/s "
         f"({result.link_bytes_per_s * 8 / 1e6:.0f} Mbit/s)")
    settle([sync_a.pid], timeout_s=timeout)
    if not sync_a.running():
        raise LanError(f"A's cairn sync exited:\n{_tail(sync_a.text())}")

    for label in RUNS:
        kind, peers = label.split()
        extra = (NO_PEERS,) if peers == "alone" else ()
        b = net.device("dvb", f"b-{kind}-{peers}", net.new_code("alice"))
        before, a_before = net.stats(), cpu_seconds(sync_a.pid)
        if kind == "get":
            out = work / f"{kind}-{peers}.bin"
            done = b.ok("get", *extra, f"{REMOTE_FOLDER}/big.bin", out, timeout=timeout)
            after, a_after = net.stats(), cpu_seconds(sync_a.pid)
            seconds, b_cpu, b_rss = done.seconds, done.cpu_seconds, done.peak_rss_mib
        else:
            folder = work / f"{kind}-{peers}-folder"
            folder.mkdir()
            started = time.perf_counter()
            run = b.start("sync", folder, "--remote", REMOTE_FOLDER, "-v", *extra,
                          log_name="sync.log")
            arrived = wait_for_file(folder / "big.bin", size, started + timeout, check=run)
            after, a_after = net.stats(), cpu_seconds(sync_a.pid)
            seconds, b_cpu, b_rss = arrived - started, cpu_seconds(run.pid), peak_rss_mib(run.pid)
            out = folder / "big.bin"
            exit_code = run.stop()
            if exit_code != 0 or "Traceback" in run.text():
                raise LanError(f"B's {label} exited {exit_code}:\n{_tail(run.text())}")
        if file_hash(out) != digest:
            raise AssertionError(f"{label}: B's copy differs from A's file")
        out.unlink()
        result.runs[label] = fetched = FetchRun(
            label=label, seconds=seconds,
            served_blocks=int(after["blocks_served"]) - int(before["blocks_served"]),
            served_bytes=int(after["bytes_served"]) - int(before["bytes_served"]),
            b_cpu_seconds=b_cpu, b_peak_rss_mib=b_rss, a_cpu_seconds=a_after - a_before)
        note(f"{label}: {seconds:.1f} s ({size / seconds / 1e6:.1f} MB/s); the appliance "
             f"served {fetched.served_blocks} of {result.blocks} blocks; CPU B "
             f"{b_cpu:.1f} s, A {fetched.a_cpu_seconds:.1f} s; B's peak RSS {b_rss:.0f} MiB")

    result.a_peak_rss_mib = peak_rss_mib(sync_a.pid)
    if not sync_a.running() or "Traceback" in sync_a.text():
        raise LanError(f"A's cairn sync failed:\n{_tail(sync_a.text())}")
    for kind in ("get", "sync"):
        note(f"{kind}: {result.speedup(kind):.1f}x faster with peers")
    return result
