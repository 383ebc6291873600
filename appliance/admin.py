"""The running appliance's admin socket: store work asked for by other `cairnd` commands.

While `cairnd serve` runs it owns the disks (appliance/owner.py). `cairnd scrub`, `cairnd
disks` and `cairnd fsck` then send their work here instead of opening the disks a second
time, so it is done by the same store objects that serve the API: one view of every disk's
state, one writer of shards.

The socket is HOME/run/admin.sock, a Unix socket of mode 0600 (only the appliance's own
user, or root, may connect; the peer's uid is checked too). The protocol is JSON lines:

    client: {"command": "scrub", "args": {}}
    server: {"progress": {...}}            zero or more, at most a few a second
    server: {"result": {...}}              or {"error": {"message": ..., "exit_code": N}}

One request per connection. A client that goes away cancels its work at the next block
(scrub, fsck); so does the server stopping.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from appliance.errors import CairnApplianceError
from appliance.meta.database import Metadata
from appliance.owner import run_dir
from appliance.storage.async_store import AsyncBlockStore

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
PROGRESS_EVERY_S = 0.25

Progress = Callable[[dict[str, Any]], None]   # called from the worker thread
Handler = Callable[["AdminRequest"], Awaitable[dict[str, Any]]]


def socket_path(home: Path) -> Path:
    return run_dir(home) / SOCKET_NAME


class Cancelled(Exception):
    """The client went away or the server is stopping: stop the work at the next step."""


@dataclass
class AdminRequest:
    """One command being run: its arguments, and a progress callback for the worker
    thread that raises Cancelled once the work should stop."""

    args: dict[str, Any]
    progress: Progress
    cancelled: threading.Event


@dataclass(frozen=True)
class AdminParts:
    """What the commands work on: the serving appliance's own store and database."""

    store: AsyncBlockStore
    meta: Metadata


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve_admin(home: Path, handlers: dict[str, Handler], stopping: threading.Event,
                      *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
    """Listen on HOME/run/admin.sock until cancelled, running each request's handler."""
    path = socket_path(home)
    path.unlink(missing_ok=True)   # left by a server that was killed (we hold the lock)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)    # the socket is born 0600: no window with a wider mode
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    own_uid = os.getuid()
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                conn, _ = await listener.accept()
                if _peer_uid(conn) not in (0, own_uid):
                    log.warning("admin socket: refused a client of another user")
                    conn.close()
                    continue
                nursery.start_soon(_serve_one, trio.SocketStream(conn), handlers, stopping)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _read_request(stream: trio.SocketStream) -> dict[str, Any]:
    buffer = b""
    with trio.fail_after(REQUEST_TIMEOUT_S):
        while b"\n" not in buffer:
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise ValueError("the client closed the connection before its request")
            buffer += chunk
            if len(buffer) > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
    request = json.loads(buffer.split(b"\n", 1)[0])
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError("a request is {\"command\": NAME, \"args\": {...}}")
    return request


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message).encode() + b"\n")


async def _serve_one(stream: trio.SocketStream, handlers: dict[str, Handler],
                     stopping: threading.Event) -> None:
    async with stream:
        try:
            request = await _read_request(stream)
        except (ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("admin socket: bad request: %s", exc)
            return
        name = request["command"]
        handler = handlers.get(name)
        if handler is None:
            await _send(stream, {"error": {"message": f"unknown admin command {name!r}",
                                           "exit_code": 2}})
            return
        cancelled = threading.Event()
        token = trio.lowlevel.current_trio_token()
        last = 0.0

        def progress(fields: dict[str, Any]) -> None:
            nonlocal last
            if cancelled.is_set() or stopping.is_set():
                raise Cancelled()
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                try:
                    trio.from_thread.run(_send, stream, {"progress": fields},
                                         trio_token=token)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    cancelled.set()
                    raise Cancelled() from None

        args = request.get("args") or {}
        log.info("admin socket: %s %s", name, json.dumps(args) if args else "")
        try:
            reply: dict[str, Any] = {"result": await handler(
                AdminRequest(args if isinstance(args, dict) else {}, progress, cancelled))}
        except Cancelled:
            log.info("admin socket: %s cancelled", name)
            return
        except CairnApplianceError as exc:
            reply = {"error": {"message": exc.message, "exit_code": exc.exit_code}}
        except Exception as exc:
            log.exception("admin socket: %s failed", name)
            reply = {"error": {"message": f"{name} failed in the appliance: {exc}",
                               "exit_code": 1}}
        finally:
            cancelled.set()
        try:
            await _send(stream, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.info("admin socket: the client of %s left before its answer", name)
