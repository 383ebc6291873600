"""`cairnd serve`: run the appliance — HTTPS API and background maintenance — until a signal.

Theory of operation:

1. Load the config; make the TLS certificate, and the device CA (appliance/device_ca.py),
   if the home has none ("made at first start");
   take the home's owner lock (HOME/run/serve.lock, appliance/owner.py): one process owns
   the disks.
2. Bind the listening socket here, not in hypercorn, so that a bind failure is a clear
   ListenError and `--listen HOST:0` tells us the port the kernel chose. `serve_https`
   (appliance/https.py) serves it: hypercorn's trio worker with TLS streams of our own
   that hand over whole bodies in large chunks instead of 16 KiB records.
3. Open the block store and the metadata database and start, in one trio nursery,
   the HTTPS server, the admin socket (HOME/run/admin.sock: `cairnd scrub`, `disks`,
   `fsck` run in here while we serve, and `stats` reads this process's counters,
   appliance/admin.py), the watch on revoked devices (for `/events`), the maintenance task
   (background scrub and repair queue, rate-limited), the copies of the home on the
   data disks (appliance/home_copies.py), garbage collection, and the mDNS advertiser
   (only on the interfaces of the listen address; nothing on loopback).
4. Once hypercorn listens, print exactly one line on stdout —
   `cairnd: serving https://HOST:PORT (appliance ID, certificate sha256 FINGERPRINT)` —
   and write HOME/run/serve.json (url, port, pid, fingerprint) for scripts and tests.
   (`--next-steps` adds, after that line, what to do next: appliance/next_steps.py.)
5. SIGTERM or SIGINT asks hypercorn to stop gracefully (in-flight requests get
   GRACEFUL_TIMEOUT_S); then maintenance is cancelled, a last copy of the home written
   to the disks, the store closed and serve.json removed, and the process exits 0.
   A second signal cancels at once.

Logs go to stderr with timestamps; stdout carries only the serving line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.typing import ASGIFramework

from appliance.admin import serve_admin
from appliance.advertise import run_advertiser
from appliance.api.bodylimit import MAX_HEAD_BYTES
from appliance.api.context import ApiContext, ApiSettings
from appliance.api.notify import watch_revocations
from appliance.collect import run_gc_loop
from appliance.config import ApplianceConfig, format_listen, load_config
from appliance.device_ca import ensure_device_ca
from appliance.errors import ConfigError, ListenError
from appliance.fsck_loop import run_fsck_loop
from appliance.home_copies import HomeCopier
from appliance.https import serve_https
from appliance.meta import accounts
from appliance.meta.database import Metadata
from appliance.owner import RUN_DIR, own_disks
from appliance.server import create_app
from appliance.stats import stats_handler
from appliance.storage import allocator
from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.blockstore import BlockStore
from appliance.storage.maintenance import run_maintenance
from appliance.storage.repair_queue import RepairQueue
from appliance.store_commands import server_handlers
from appliance.tls import ensure_certificate

log = logging.getLogger("cairnd")

SERVE_INFO_NAME = "serve.json"
GRACEFUL_TIMEOUT_S = 5.0
MAINTENANCE_RESTART_S = 60.0
LAST_COPY_TIMEOUT_S = 60.0
# A burst of connects beyond the backlog is dropped by the kernel and retried by the
# client a second later: 1,000 at once against 128 cost 7 s. (Capped by net.core.somaxconn.)
LISTEN_BACKLOG = 1024
TLS_HANDSHAKE_TIMEOUT_S = 10.0   # hypercorn's default, 60 s, let a silent socket sit a minute
# Also the header timeout: hypercorn closes a connection whose next request head is not
# complete this long after the connection opened or the last answer ended.
KEEP_ALIVE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ServeInfo:
    """What a running appliance tells the world: the serving line and run/serve.json."""

    url: str
    host: str
    port: int
    pid: int
    appliance_id: str
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def announcement(self) -> str:
        return (f"cairnd: serving {self.url} (appliance {self.appliance_id}, "
                f"certificate sha256 {self.fingerprint})")


AfterStart = Callable[[ServeInfo], list[str]]   # lines to print after the serving line


def configure_logging(level: int = logging.INFO) -> None:
    """Timestamped lines on stderr, hypercorn's included (it logs through our handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# --- the pieces ----------------------------------------------------------------------------

def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to HOST:PORT (not yet listening). Raises ListenError."""
    where = format_listen(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "; another program holds the port (choose another with --listen)",
            errno.EADDRNOTAVAIL: "; that is not an address of this machine",
            errno.EACCES: "; ports below 1024 need privileges",
        }.get(exc.errno or 0, "")
        raise ListenError(f"cannot listen on {where}: {exc.strerror}{hint}") from None
    return sock


def check_tls_files(config: ApplianceConfig) -> str:
    """Make the certificate if absent, check the pair loads, return its fingerprint."""
    fingerprint = ensure_certificate(config.tls_certificate, config.tls_key,
                                     config.listen_host)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_certificate, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {config.tls_certificate} and key "
                          f"{config.tls_key} cannot be used together: {exc}") from None
    if config.tls_key.stat().st_mode & 0o077:
        log.warning("TLS key %s is readable by other users; chmod 600 it", config.tls_key)
    return fingerprint


def hypercorn_config(config: ApplianceConfig) -> HypercornConfig:
    """Hypercorn settings (the socket is handed to serve_https, not bound by hypercorn)."""
    hc = HypercornConfig()
    hc.certfile = str(config.tls_certificate)
    hc.keyfile = str(config.tls_key)
    hc.backlog = LISTEN_BACKLOG
    hc.graceful_timeout = GRACEFUL_TIMEOUT_S
    # Limits on clients (README, "Limits"). No read_timeout: it would also cut event
    # streams and slow downloads, where the client rightly sends nothing; bodies are timed
    # by appliance/api/bodylimit.py. Only HTTP/1.1: no client speaks h2, whose streams and
    # frames would need limits of their own.
    hc.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
    hc.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    hc.h11_max_incomplete_size = MAX_HEAD_BYTES
    hc.alpn_protocols = ["http/1.1"]
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.include_server_header = False
    return hc


def api_settings(config: ApplianceConfig) -> ApiSettings:
    return ApiSettings(url_lifetime_s=config.url_lifetime_s,
                       rate_limit_per_s=config.rate_limit_per_s,
                       rate_limit_burst=config.rate_limit_burst,
                       lan_admission=config.lan_admission)


def ensure_url_key(home: Path) -> bytes:
    """The key that signs block URLs: 32 random bytes in HOME/secrets/url.key (0600),
    made at first start. Replacing the file invalidates every outstanding URL."""
    path = home / "secrets" / "url.key"
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        log.warning("%s is damaged; making a new URL key", path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    return path.read_bytes()


def write_serve_info(home: Path, info: ServeInfo) -> Path:
    path = home / RUN_DIR / SERVE_INFO_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


async def _maintain(store: AsyncBlockStore, config: ApplianceConfig) -> None:
    """Background scrub and repair. A crash there is logged and retried later: it must not
    take the API down with it."""
    while True:
        try:
            await run_maintenance(
                store, rate_bytes_per_s=config.scrub_rate_mb_per_s * 1e6,
                full_scrub_interval_s=config.full_scrub_interval_s)
            return
        except Exception:
            log.exception("background maintenance failed; restarting it in %.0f s",
                          MAINTENANCE_RESTART_S)
            await trio.sleep(MAINTENANCE_RESTART_S)


async def _copy_home(copier: HomeCopier) -> None:
    """Keep the copies of the home on the data disks current (appliance/home_copies.py)."""
    while True:
        try:
            # Abandoned when cancelled: a copy stuck on a disk must not hold up a stop.
            result = await trio.to_thread.run_sync(copier.copy_if_changed,
                                                   abandon_on_cancel=True)
            if result is not None:
                log.debug("home copy %d on %s (%.2f s)", result.sequence,
                          ", ".join(result.disks), result.seconds)
        except Exception:
            log.exception("copying the home to the data disks failed; trying again")
        await trio.sleep(copier.delay())


def _last_home_copy(copier: HomeCopier) -> None:
    """At a stop, one last copy, so that a clean stop loses nothing if the home is lost.
    In a thread of its own, waited on for LAST_COPY_TIMEOUT_S: a disk that stopped
    answering must not keep the appliance from stopping (the copies go straight to the
    disks, without the store's per-call deadlines)."""
    def copy() -> None:
        try:
            result = copier.copy_now(clean=True)
            if result is not None:
                log.info("home copied to %s (copy %d, database %.1f MB, %.2f s)",
                         ", ".join(result.disks), result.sequence,
                         result.database_bytes / 1e6, result.seconds)
        except Exception:
            log.exception("the last copy of the home failed")
        finally:
            copier.close()

    worker = threading.Thread(target=copy, name="cairn-last-home-copy", daemon=True)
    worker.start()
    worker.join(LAST_COPY_TIMEOUT_S)
    if worker.is_alive():
        log.error("the last copy of the home did not finish in %.0f s (a disk not "
                  "answering?); stopping without it", LAST_COPY_TIMEOUT_S)


# --- running -------------------------------------------------------------------------------

async def run_appliance(config: ApplianceConfig, *, shutdown: trio.Event,
                        task_status: trio.TaskStatus[ServeInfo] = trio.TASK_STATUS_IGNORED,
                        ) -> None:
    """Serve until `shutdown` is set. Reports a ServeInfo through `task_status` once the
    socket listens (use with `nursery.start`)."""
    fingerprint = check_tls_files(config)
    device_ca = ensure_device_ca(config.home, config.appliance_id)
    with own_disks(config.home, "cairnd serve"):
        sock = bind_listening_socket(config.listen_host, config.listen_port)
        port = int(sock.getsockname()[1])
        hc = hypercorn_config(config)
        store = AsyncBlockStore(BlockStore(config.store, RepairQueue(config.database)))
        meta = Metadata(config.database)
        copier = HomeCopier(config, store.store.disks)
        context = ApiContext(
            meta=meta, store=store, url_key=ensure_url_key(config.home),
            fingerprint=bytes.fromhex(fingerprint), appliance_id=config.appliance_id,
            settings=api_settings(config), device_ca=device_ca)
        info = ServeInfo(
            url=f"https://{format_listen(config.listen_host, port)}", host=config.listen_host,
            port=port, pid=os.getpid(), appliance_id=config.appliance_id,
            fingerprint=fingerprint)
        info_path: Path | None = None
        stopping = threading.Event()
        try:
            # Starlette's ASGI signature is looser than hypercorn's typed one; same protocol.
            app = cast(ASGIFramework, create_app(store, context))
            async with trio.open_nursery() as nursery:

                async def stop_requested() -> None:
                    await shutdown.wait()
                    stopping.set()            # admin commands stop at their next step
                    context.notifier.close()  # end event streams: they would hold us up

                async def serve_http(task_status: trio.TaskStatus[list[str]]) -> None:
                    await serve_https(app, hc, sock, shutdown_trigger=stop_requested,
                                      task_status=task_status)
                    nursery.cancel_scope.cancel()  # hypercorn is done: stop maintenance

                # Before the API: a stream never takes the starting count for a revocation.
                await nursery.start(watch_revocations, context.notifier,
                                    lambda: meta.read(accounts.revoked_count))
                await nursery.start(serve_http)
                handlers = server_handlers(config, store, meta, context.block_locks)
                handlers["stats"] = stats_handler(context.counters)
                await nursery.start(serve_admin, config.home, handlers, stopping)
                nursery.start_soon(_maintain, store, config)
                nursery.start_soon(_copy_home, copier)
                nursery.start_soon(partial(run_fsck_loop, meta, store,
                                           grace_s=config.gc_grace_s))
                nursery.start_soon(run_gc_loop, meta, store, context.block_locks,
                                   config.gc_grace_s, config.gc_interval_s)
                if config.advertise:
                    nursery.start_soon(run_advertiser, config.listen_host, port,
                                       config.appliance_id, fingerprint)
                else:
                    log.info("not advertising on the LAN: [discovery] advertise = false")
                info_path = write_serve_info(config.home, info)
                log.info("appliance %s listening on %s", config.appliance_id, info.url)
                task_status.started(info)
        finally:
            _last_home_copy(copier)
            store.close()
            meta.close()
            if info_path is not None:
                info_path.unlink(missing_ok=True)
            log.info("appliance stopped")


async def serve_until_signalled(config: ApplianceConfig,
                                after_start: AfterStart | None = None) -> None:
    """Serve until SIGTERM or SIGINT; once listening, print the serving line and then
    the lines AFTER_START gives for it, if any."""
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if shutdown.is_set():
                        log.warning("%s again: stopping now", name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("%s: shutting down", name)
                    shutdown.set()

            async def run(task_status: trio.TaskStatus[ServeInfo]) -> None:
                await run_appliance(config, shutdown=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop watching for signals

            nursery.start_soon(watch_signals)
            info = await nursery.start(run)
            print(info.announcement(), flush=True)
            for line in after_start(info) if after_start is not None else ():
                print(line, flush=True)


def serve(home: Path, listen_override: tuple[str, int] | None = None, *,
          after_start: AfterStart | None = None) -> None:
    """Run the appliance in HOME until SIGTERM or SIGINT (blocking); AFTER_START: see
    serve_until_signalled."""
    config = load_config(home)
    if listen_override is not None:
        config = config.with_listen(*listen_override)
    configure_logging()
    allocator.tune()  # before any thread starts: the arena cap applies to new arenas only
    try:
        trio.run(partial(serve_until_signalled, config, after_start))
    except BaseExceptionGroup as group:
        # trio's nurseries wrap errors in groups; the CLI wants the one error a user caused.
        raise _sole_error(group) from None


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The only leaf of a group when there is just one (else the group itself)."""
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    return leaves[0] if len(leaves) == 1 else group
