"""The commands that touch the block store (`cairnd disks`, `scrub`, `fsck`), written once
and run in one of two places (appliance/owner.py explains why):

- inside the running `cairnd serve`, on its own store, when a client asks through the
  admin socket (appliance/admin.py): `server_handlers`;
- in the `cairnd` process itself when no server runs, holding the owner lock while it
  opens the disks: `run_store_command` in appliance/admin_client.py.

Each command is a blocking function of the store, the config, its arguments and a
progress callback, returning a JSON-ready dict; the CLI prints that dict the same way
wherever it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from appliance.admin import AdminRequest, Handler, Progress
from appliance.config import ApplianceConfig
from appliance.fsck import BlockGuard, fsck_command, unguarded
from appliance.fsck_loop import TrioBlockGuard
from appliance.locks import KeyedLocks
from appliance.meta.database import Metadata
from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.blockstore import BlockStore
from appliance.storage.scrub import Scrubber, ScrubProgress


@dataclass(frozen=True)
class StoreParts:
    """What a command works on. Inside the server also its database connection and its
    per-block locks (as a BlockGuard), so that repairs never interleave with an upload or
    GC of the same block; in the CLI those are None (it owns the home alone)."""

    config: ApplianceConfig
    store: BlockStore
    meta: Metadata | None = None
    guard: BlockGuard | None = None


StoreCommand = Callable[[StoreParts, dict[str, Any], Progress], dict[str, Any]]


def disks_command(parts: StoreParts, args: dict[str, Any], progress: Progress
                  ) -> dict[str, Any]:
    return {"disks": [status.to_json() for status in parts.store.disk_status()]}


def scrub_command(parts: StoreParts, args: dict[str, Any], progress: Progress
                  ) -> dict[str, Any]:
    def report_progress(step: ScrubProgress) -> None:
        progress({"checked": step.checked, "bytes_verified": step.bytes_verified,
                  "elapsed": step.elapsed})

    report = Scrubber(parts.store).run(report_progress)
    return {"report": report.to_json(), "summary": report.summary()}


def fsck_store_command(parts: StoreParts, args: dict[str, Any], progress: Progress
                       ) -> dict[str, Any]:
    return fsck_command(parts.config, parts.store, args, progress, meta=parts.meta,
                        guard=parts.guard or unguarded)


COMMANDS: dict[str, StoreCommand] = {
    "disks": disks_command,
    "scrub": scrub_command,
    "fsck": fsck_store_command,
}


def server_handlers(config: ApplianceConfig, store: AsyncBlockStore, meta: Metadata,
                    locks: KeyedLocks) -> dict[str, Handler]:
    """The admin socket's handlers: each command in a worker thread (trio's: the block
    guard calls back into the event loop from it), on the server's store and database."""
    parts = StoreParts(config, store.store, meta, TrioBlockGuard(locks))

    def handler(command: StoreCommand) -> Handler:
        async def handle(request: AdminRequest) -> dict[str, Any]:
            return await trio.to_thread.run_sync(command, parts, request.args,
                                                 request.progress)
        return handle

    return {name: handler(command) for name, command in COMMANDS.items()}
