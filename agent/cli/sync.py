"""`cairn sync DIR`, and the sync folders' records that `cairn status` shows."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import click
import trio

from agent import operations as ops
from agent.cli.shell import cli, home_of, interrupted, size_text, status_sections
from agent.errors import SyncPausedError
from agent.home import AgentHome
from agent.peers.service import peers_if_wanted, read_statuses
from agent.peers.sources import SyncedFiles
from agent.stopping import Stopped, until_signalled
from agent.sync.engine import (
    MASS_DELETE_MIN,
    MASS_DELETE_SHARE,
    SyncEngine,
    SyncOptions,
    describe,
    open_folder,
)
from agent.sync.state import DB_FILE, SyncDb

# --- sync ----------------------------------------------------------------------------

@cli.command()
@click.argument("directory", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--remote", "remote_path", default="/", show_default=True,
              help="The folder on the appliance to keep DIR in step with (created if "
                   "missing). A DIR keeps the folder it was first synced with.")
@click.option("--allow-mass-delete", is_flag=True,
              help="Go ahead when DIR is empty or many files were deleted at once (by "
                   "default the agent pauses: an unmounted drive looks like that too).")
@click.option("--mass-delete-share", type=click.FloatRange(0.0, 1.0),
              default=MASS_DELETE_SHARE, show_default=True,
              help="Pause when one pass would delete more than this share of the synced "
                   f"files on the appliance (and at least {MASS_DELETE_MIN}).")
@click.option("--once", is_flag=True, help="Sync until nothing is left to do, then exit.")
@click.option("--no-peers", is_flag=True,
              help="Neither serve blocks to this user's other devices on the LAN nor "
                   "fetch from them (also `[peers] enabled = false` in HOME/config.toml).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
@click.pass_context
def sync(ctx: click.Context, directory: Path, remote_path: str, allow_mass_delete: bool,
         mass_delete_share: float, once: bool, no_peers: bool, verbose: bool,
         quiet: bool) -> None:
    """Keep DIR and a folder on the appliance identical, both ways, until stopped.

    Changes here are picked up at once (inotify, plus a full rescan every few minutes);
    changes from other devices arrive through the appliance's event stream. Edits made
    while the appliance is away are kept and sent when it is back. When both sides
    changed a file, the last writer keeps the name and the other version is kept beside
    it as `NAME (conflicted copy from DEVICE DATE TIME).EXT`; an edit beats a delete.
    Deletions arriving from elsewhere can be undone with `cairn restore`. Items others
    shared with you appear under `Shared with me/OWNER/`, read-only.

    Symbolic links are synced as links (their targets as they are, never followed: a
    link pointing outside DIR stays a link and nothing it points to is read). Skipped:
    special files (fifos, sockets, devices), editor temporaries, and what
    DIR/.cairnignore lists (gitignore syntax). `cairn status` shows each folder's state.

    While it runs, this user's other devices on the LAN may fetch the blocks of DIR's
    synced files from here (mutual TLS with certificates the appliance signed, and only
    with a grant the appliance issued for those blocks), and downloads here ask them too;
    `--no-peers` or `[peers] enabled = false` in HOME/config.toml turns that off.

    SIGTERM or Ctrl-C stops it cleanly with exit 0 (a transfer in hand finishes its
    block; what is not done yet is picked up by the next run). With --once, being stopped
    early exits 143 (SIGTERM) or 130 (Ctrl-C), and a pass that paused at a safety check
    exits 11.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else
                        logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "hypercorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    home = home_of(ctx)
    options = SyncOptions(allow_mass_delete=allow_mass_delete,
                          mass_delete_share=mass_delete_share, once=once)
    local_dir = Path(os.path.abspath(directory))

    async def run() -> None:
        async with ops.session(home) as tree:
            db = SyncDb.of_home(home.path)
            try:
                folder = await open_folder(tree, db, local_dir, remote_path)
                engine = SyncEngine(tree, db, folder, options)
                click.echo(f"syncing {local_dir} with {folder.remote_path} as "
                           f"{tree.connection.device.device_name}", err=True)
                # LAN peers: serve this user's synced files to their other devices (and
                # let this process's downloads find them); never a reason to fail sync.
                source = SyncedFiles(home.path / DB_FILE)
                try:
                    async with peers_if_wanted(home, tree.api, source, wanted=not no_peers):
                        await engine.run()
                except BaseException:     # stopped (a signal) or failed: say so last
                    mark_stopped(db, folder.local_dir)
                    raise
                finally:
                    source.close()
                if once:
                    outcome = engine.last_outcome
                    click.echo(f"{outcome.uploaded} uploaded, {outcome.downloaded} "
                               f"downloaded, {len(outcome.conflicts)} conflicts, "
                               f"{len(outcome.failed)} skipped", err=True)
                    record = db.folder(str(local_dir))
                    if record is not None and record.state == "paused":
                        raise SyncPausedError(record.detail)
            finally:
                db.close()

    outcome = trio.run(until_signalled, run)
    if isinstance(outcome, Stopped):
        if once:
            raise interrupted(outcome, resumable=True)
        click.echo(f"stopped syncing {local_dir} ({outcome.name})", err=True)


def mark_stopped(db: SyncDb, local_dir: str) -> None:
    """The folder's last status: no agent is syncing it (its counts kept)."""
    record = db.folder(local_dir)
    if record is not None:
        db.set_status(record.id, "stopped", "", record.pending, record.conflicts)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sync_records(home: AgentHome) -> list[dict[str, Any]]:
    if not (home.path / DB_FILE).exists():
        return []
    db = SyncDb.of_home(home.path)
    try:
        return [{"dir": r.local_dir, "remote": r.remote_path,
                 "state": r.state if r.pid and process_alive(r.pid) else "not running",
                 "detail": r.detail, "pending": r.pending, "conflicts": r.conflicts,
                 "updated_at": r.updated_at} for r in db.folders()]
    finally:
        db.close()


def sync_folders(home: AgentHome) -> list[str]:
    if not (home.path / DB_FILE).exists():
        return []
    db = SyncDb.of_home(home.path)
    try:
        return ["sync " + describe(r, process_alive) for r in db.folders()]
    finally:
        db.close()


def peers_status(home: AgentHome) -> tuple[str, Any, list[str]]:
    """`cairn status`: the peer services of this home (sync's, the drive's) that run."""
    statuses = read_statuses(home)
    lines = []
    for status in statuses:
        refused = sum(status["refusals"].values())
        lines.append(f"peers (pid {status['pid']}): serving on "
                     f"{', '.join(status['addresses'])} port {status['port']}"
                     f"{'' if status['advertised'] else ' (not advertised)'}; "
                     f"{status['peers']} peer(s) found; {status['served_blocks']} block(s) "
                     f"served ({size_text(status['served_bytes'])}), {refused} refused")
    return "peers", statuses, lines


status_sections.append(peers_status)
