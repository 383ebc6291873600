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
from appliance.storage.async_store import AsyncBlockStore
from appliance.storage.blockstore import BlockStore
from appliance.storage.scrub import Scrubber, ScrubProgress


@dataclass(frozen=True)
class StoreParts:
    config: ApplianceConfig
    store: BlockStore


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


COMMANDS: dict[str, StoreCommand] = {
    "disks": disks_command,
    "scrub": scrub_command,
}


def server_handlers(config: ApplianceConfig, store: AsyncBlockStore) -> dict[str, Handler]:
    """The admin socket's handlers: each command in a worker thread, on the server's store."""
    parts = StoreParts(config, store.store)

    def handler(command: StoreCommand) -> Handler:
        async def handle(request: AdminRequest) -> dict[str, Any]:
            return await trio.to_thread.run_sync(command, parts, request.args,
                                                 request.progress)
        return handle

    return {name: handler(command) for name, command in COMMANDS.items()}
