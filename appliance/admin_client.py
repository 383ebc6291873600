"""Run a store command (appliance/store_commands.py) where it belongs: through the running
appliance's admin socket when `cairnd serve` runs, else here, holding the owner lock.

A server that is starting holds the lock before its socket listens, so a command that
finds the lock taken and no socket waits a little (STARTUP_WAIT_S) and asks again.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from appliance.admin import Progress, socket_path
from appliance.config import load_config
from appliance.errors import AdminError, HomeBusyError
from appliance.owner import own_disks
from appliance.storage.blockstore import BlockStore
from appliance.storage.repair_queue import RepairQueue
from appliance.store_commands import COMMANDS, StoreParts

STARTUP_WAIT_S = 10.0
RETRY_S = 0.2


def run_store_command(home: Path, command: str, args: dict[str, Any],
                      progress: Progress) -> tuple[dict[str, Any], bool]:
    """COMMAND's result, and whether the running server did it (False: this process did,
    on the disks directly)."""
    config = load_config(home)
    deadline = time.monotonic() + STARTUP_WAIT_S
    while True:
        answer = ask_server(config.home, command, args, progress)
        if answer is not None:
            return answer, True
        try:
            with own_disks(config.home, f"cairnd {command}"):
                store = BlockStore(config.store, RepairQueue(config.database))
                try:
                    return COMMANDS[command](StoreParts(config, store), args, progress), False
                finally:
                    store.close()
        except HomeBusyError as exc:
            if time.monotonic() > deadline:
                raise HomeBusyError(f"{exc.message}, and its admin socket "
                                    f"{socket_path(config.home)} does not answer") from None
        time.sleep(RETRY_S)


def ask_server(home: Path, command: str, args: dict[str, Any],
               progress: Progress) -> dict[str, Any] | None:
    """Run COMMAND in the serving appliance and return its result; None when no server
    listens on the admin socket. AdminError carries a failure there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(socket_path(home)))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
        with sock.makefile("rb") as replies:
            for line in replies:
                message = json.loads(line)
                if "progress" in message:
                    progress(message["progress"])
                elif "result" in message:
                    return dict(message["result"])
                elif "error" in message:
                    error = message["error"]
                    raise AdminError(str(error.get("message")),
                                     int(error.get("exit_code", 1)))
        raise AdminError(f"the appliance ended `{command}` without an answer "
                         "(did it stop? see its log)")
    finally:
        sock.close()
