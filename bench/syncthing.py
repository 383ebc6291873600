"""Two Syncthing devices on 127.0.0.1 only, sharing one folder, for bench/compare.py.

Syncthing 1.19.2 from Debian (`apt-get install -y syncthing` when `syncthing` is missing).
Each device gets a home of its own (`syncthing generate --home H --no-default-folder`) whose
config.xml is edited before the first start:

- the GUI/REST API on 127.0.0.1:PORT with an API key of ours (no TLS, no user);
- one listen address, `tcp://127.0.0.1:PORT` (no QUIC, so no STUN either);
- global and local discovery off, relays off, NAT traversal (UPnP/NAT-PMP) off, usage
  reporting refused (urAccepted -1), crash reporting off, automatic upgrades off
  (autoUpgradeIntervalH 0), no browser;
- each device knows the other by its id at the explicit address tcp://127.0.0.1:PORT;
- one shared folder (FOLDER_ID, sendreceive, both devices), copied from the config's own
  folder defaults with two changes, the fairness settings of the comparison: the
  filesystem watcher on (fsWatcherEnabled true, Syncthing's default too) with its delay at
  WATCHER_DELAY_S = 1 s instead of the default 10 s. Everything else stays at Syncthing's
  defaults: fsync on (disableFsync false), hashers/copiers automatic, random pull order,
  rescan every hour, compression of metadata only, setLowPriority true (Syncthing puts
  itself at nice 9 and best-effort I/O priority 5; it runs alone on the machine but for
  this bench's own writing and polling).

`syncthing serve --home H --no-browser --no-restart --no-upgrade` runs each device with
STNODEFAULTFOLDER=1, STNOUPGRADE=1 and STNORESTART=1 in its environment. Even so, 1.19
starts a monitor process that runs the syncer as its child and relays its log
(--no-restart only keeps it from restarting the syncer): a device's CPU and memory are the
sum over the started process's whole tree (`harness.process_tree`), monitor and syncer.
`stop` sends SIGTERM to the started process and kills it after a timeout, then any child of
it still alive: only the processes this module started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import BenchError, cpu_seconds, ensure_debian_package, process_tree, rss_mib, terminate

FOLDER_ID = "cairn-bench"
WATCHER_DELAY_S = 1
START_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
INSTALL_TIMEOUT_S = 600.0
DEVICE_ID_LINE = re.compile(r"Device ID: ([A-Z0-9-]{63})")

# options/ELEMENT -> the value written (see the module's docstring)
OPTIONS = {
    "globalAnnounceEnabled": "false",
    "localAnnounceEnabled": "false",
    "relaysEnabled": "false",
    "natEnabled": "false",
    "urAccepted": "-1",
    "crashReportingEnabled": "false",
    "autoUpgradeIntervalH": "0",
    "startBrowser": "false",
}
FOLDER_SETTINGS = {"type": "sendreceive", "fsWatcherEnabled": "true",
                   "fsWatcherDelayS": str(WATCHER_DELAY_S)}


def ensure_installed() -> str:
    """The `syncthing` binary's path, installed from Debian first when missing; its version
    is printed. Raises BenchError if it cannot be installed."""
    return ensure_debian_package("syncthing", timeout=INSTALL_TIMEOUT_S)


def version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30,
                            check=False)
    return result.stdout.strip() or result.stderr.strip()


def free_ports(count: int) -> list[int]:
    """COUNT distinct ports free on 127.0.0.1 now (the kernel's picks; all held open until
    every one is chosen, then released for Syncthing to bind)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _child(parent: ET.Element, tag: str) -> ET.Element:
    found = parent.find(tag)
    if found is None:
        raise BenchError(f"syncthing's config.xml has no <{tag}> under <{parent.tag}>")
    return found


@dataclass
class Device:
    """One Syncthing device: its home (config, keys, database, log) and its folder."""

    name: str
    home: Path
    folder: Path
    binary: str
    gui_port: int
    listen_port: int
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    device_id: str = ""
    process: subprocess.Popen[bytes] | None = None
    _tree: list[int] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.home / "syncthing.log"

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    def generate(self) -> None:
        """`syncthing generate`: the keys, the device id and a default config.xml."""
        result = subprocess.run(
            [self.binary, "generate", "--home", str(self.home), "--no-default-folder",
             "--skip-port-probing"], capture_output=True, text=True, timeout=60,
            env=self._env(), check=False)
        match = DEVICE_ID_LINE.search(result.stdout + result.stderr)
        if result.returncode != 0 or match is None:
            raise BenchError(f"syncthing generate ({self.name}) exited {result.returncode}: "
                             f"{(result.stdout + result.stderr).strip()[-1000:]}")
        self.device_id = match[1]

    def configure(self, peer: Device) -> None:
        """Edit config.xml as the module's docstring says (before the first start)."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = _child(root, "gui")
        gui.set("enabled", "true")
        gui.set("tls", "false")
        _child(gui, "address").text = f"127.0.0.1:{self.gui_port}"
        _child(gui, "apikey").text = self.api_key
        options = _child(root, "options")
        for extra in options.findall("listenAddress")[1:]:
            options.remove(extra)
        _child(options, "listenAddress").text = self.address
        for tag, value in OPTIONS.items():
            _child(options, tag).text = value
        defaults = _child(root, "defaults")
        me = next((d for d in root.findall("device") if d.get("id") == self.device_id), None)
        if me is None:
            raise BenchError(f"syncthing's config.xml ({self.name}) lists no device "
                             f"{self.device_id}")
        me.set("name", self.name)
        other = _copy(_child(defaults, "device"))
        other.set("id", peer.device_id)
        other.set("name", peer.name)
        _child(other, "address").text = peer.address
        root.insert(list(root).index(me) + 1, other)
        folder = _copy(_child(defaults, "folder"))
        folder.set("id", FOLDER_ID)
        folder.set("label", FOLDER_ID)
        folder.set("path", str(self.folder))
        for key, value in FOLDER_SETTINGS.items():
            folder.set(key, value)
        for shared in folder.findall("device"):
            folder.remove(shared)
        for position, device_id in enumerate((self.device_id, peer.device_id)):
            shared = ET.Element("device", {"id": device_id, "introducedBy": ""})
            ET.SubElement(shared, "encryptionPassword").text = ""
            folder.insert(position, shared)
        root.insert(0, folder)
        tree.write(path, encoding="unicode")
        path.chmod(0o600)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ".stfolder").mkdir(exist_ok=True)     # the folder's marker

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ST") and k.lower() not in ("http_proxy", "https_proxy",
                                                                 "all_proxy")}
        env.update(STNODEFAULTFOLDER="1", STNOUPGRADE="1", STNORESTART="1")
        return env

    def start(self) -> None:
        if self.process is not None:
            raise BenchError(f"syncthing {self.name} is already running")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "serve", "--home", str(self.home), "--no-browser",
                 "--no-restart", "--no-upgrade"], stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, env=self._env())
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.check()
            with contextlib.suppress(BenchError):
                if self.rest("/rest/system/ping").get("ping") == "pong":
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"syncthing {self.name}'s REST API did not answer in "
                                 f"{START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)
        status = self.rest("/rest/system/status")
        if status.get("myID") != self.device_id:
            raise BenchError(f"syncthing {self.name} says it is {status.get('myID')}, not "
                             f"{self.device_id}")

    def rest(self, path: str) -> Any:
        """GET PATH of this device's REST API (127.0.0.1, our API key); its JSON."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.gui_port}{path}",
                                         headers={"X-API-Key": self.api_key})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise BenchError(f"syncthing {self.name} GET {path}: {exc}") from exc

    def connected_to(self, peer: Device) -> bool:
        connections = self.rest("/rest/system/connections").get("connections", {})
        return bool(connections.get(peer.device_id, {}).get("connected"))

    def folder_status(self) -> str:
        """The shared folder's state and what it still needs, for diagnostics."""
        try:
            status = self.rest(f"/rest/db/status?folder={FOLDER_ID}")
        except BenchError as exc:
            return str(exc)
        return (f"{status.get('state')}, local {status.get('localFiles')} files, global "
                f"{status.get('globalFiles')}, needs {status.get('needFiles')}")

    def pids(self) -> list[int]:
        """The started process and its children (empty once stopped)."""
        if self.process is None or self.process.poll() is not None:
            return []
        self._tree = process_tree(self.process.pid)
        return self._tree

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_mib(self) -> float:
        return sum(rss_mib(pid) for pid in self.pids())

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"syncthing {self.name} exited {self.process.returncode} (its "
                             f"log: {self.log})")

    def log_tail(self, lines: int = 15) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.strip().splitlines()[-lines:]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after TIMEOUT; then any child of it still alive is killed."""
        if self.process is None:
            return
        children = [pid for pid in (self.pids() or self._tree) if pid != self.process.pid]
        terminate(self.process, timeout)
        for pid in children:
            with contextlib.suppress(OSError):
                if "syncthing" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
        self.process = None


def _copy(element: ET.Element) -> ET.Element:
    return ET.fromstring(ET.tostring(element))


@contextlib.contextmanager
def syncthing_pair(run_dir: Path) -> Iterator[tuple[Device, Device]]:
    """Devices A and B (homes RUN_DIR/A-home, B-home; folders RUN_DIR/A-folder, B-folder),
    configured, started one after the other and connected to each other; stopped at the
    end of the block. Raises BenchError if they cannot be started or do not connect."""
    binary = ensure_installed()
    gui_a, gui_b, listen_a, listen_b = free_ports(4)
    a = Device("A", run_dir / "A-home", run_dir / "A-folder", binary, gui_a, listen_a)
    b = Device("B", run_dir / "B-home", run_dir / "B-folder", binary, gui_b, listen_b)
    try:
        for device in (a, b):
            device.generate()
        a.configure(b)
        b.configure(a)
        a.start()            # A listens before B starts: B's first dial finds it
        b.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not (a.connected_to(b) and b.connected_to(a)):
            a.check()
            b.check()
            if time.monotonic() > deadline:
                raise BenchError(f"syncthing A and B did not connect in "
                                 f"{CONNECT_TIMEOUT_S:.0f} s; A: {' | '.join(a.log_tail(5))}"
                                 f"; B: {' | '.join(b.log_tail(5))}")
            time.sleep(0.2)
        yield a, b
    finally:
        for device in (a, b):
            device.stop()
