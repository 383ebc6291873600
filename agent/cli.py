"""`cairn`, the agent's command line (click).

Every command is a thin shell: parse arguments, run the operation under trio, print the
result. Errors the agent raises on purpose (agent.errors) become one line on stderr and
their exit code, never a traceback. Progress bars appear only when stderr is a terminal.
SIGTERM and SIGINT stop a command cleanly (agent.stopping): `cairn sync` then exits 0,
any other command 128 + the signal's number, what it did so far kept (join and unlock,
which may prompt, keep Python's Ctrl-C: exit 130).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
import trio

from agent import operations as ops
from agent import trash as trash_ops
from agent.api import Api
from agent.client import Connection
from agent.enroll import enroll, unlock_keys
from agent.errors import (
    CairnAgentError,
    IncompatibleApplianceError,
    NotEnrolledError,
    SyncPausedError,
    TransportError,
    UsageError,
)
from agent.home import AgentHome, default_home
from agent.pipeline import first_error
from agent.remote import RemoteNode, RemoteTree
from agent.stopping import Interrupted, Stopped, until_signalled
from agent.sync.engine import (
    MASS_DELETE_MIN,
    MASS_DELETE_SHARE,
    SyncEngine,
    SyncOptions,
    describe,
    open_folder,
)
from agent.sync.state import DB_FILE, SyncDb
from protocol.models import Me

PASSPHRASE_ENV = "CAIRN_PASSPHRASE"
T = TypeVar("T")


class _Group(click.Group):
    """Our errors become one line on stderr and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BaseExceptionGroup as group:
            error = first_error(group)
            if isinstance(error, CairnAgentError):
                _fail(ctx, error)
            raise
        except CairnAgentError as exc:
            _fail(ctx, exc)
        except httpx.HTTPError as exc:
            _fail(ctx, TransportError(f"talking to the appliance failed: {exc}"))
        except Interrupted as exc:
            click.echo(f"cairn: {exc.message}", err=True)
            ctx.exit(exc.stopped.exit_code)
        except KeyboardInterrupt:
            click.echo("cairn: interrupted", err=True)
            ctx.exit(130)


def _fail(ctx: click.Context, error: CairnAgentError) -> None:
    click.echo(f"cairn: error: {error.message}", err=True)
    ctx.exit(error.exit_code)


def _run(function: Callable[[], Awaitable[T]]) -> T:
    """FUNCTION() under trio, for join and unlock: Ctrl-C stays a KeyboardInterrupt, which
    also ends a passphrase prompt (a signal handled by trio would not)."""
    return trio.run(function)


def _run_stoppable(function: Callable[[], Awaitable[T]], *, resumable: bool) -> T:
    """FUNCTION() under trio. SIGTERM or SIGINT stops it cleanly and raises Interrupted
    (RESUMABLE: the message says that running it again resumes)."""
    outcome = trio.run(until_signalled, function)
    if isinstance(outcome, Stopped):
        raise _interrupted(outcome, resumable)
    return outcome


def _interrupted(stopped: Stopped, resumable: bool) -> Interrupted:
    again = "; run the same command again to resume" if resumable else ""
    return Interrupted(stopped, f"interrupted by {stopped.name}{again}")


def _home(ctx: click.Context) -> AgentHome:
    return AgentHome(ctx.obj["home"])


def _in_session(ctx: click.Context, work: Callable[[RemoteTree], Awaitable[T]], *,
                resumable: bool = False) -> T:
    home = _home(ctx)

    async def run() -> T:
        async with ops.session(home) as tree:
            return await work(tree)

    return _run_stoppable(run, resumable=resumable)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


@click.group(cls=_Group, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="The agent's home (device credentials and keys). Default: $CAIRN_HOME, "
                   "else ~/.cairn.")
@click.version_option(package_name="cairn", prog_name="cairn")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Cairn agent: your files on your Cairn appliance, end-to-end encrypted.

    Start with `cairn join CODE` (the code comes from `cairnd user add NAME` or
    `cairnd user code NAME` on the appliance). Then put, get, ls, mkdir, rm, mv files;
    share them with other users; `cairn trash` and `cairn restore` bring back what was
    deleted on any device; `cairn status` shows where this device stands.

    REMOTE arguments are paths from your root folder (/docs/a.txt) or id:<node id>, which
    is how you name something another user shared with you (see `cairn shared`).
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home if home is not None else default_home()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


# --- joining ---------------------------------------------------------------------------

def _passphrase(new: bool) -> str:
    from_env = os.environ.get(PASSPHRASE_ENV)
    if from_env is not None:
        return from_env
    if not sys.stdin.isatty():
        raise UsageError(f"no passphrase: set {PASSPHRASE_ENV} or run in a terminal")
    if new:
        click.echo("This is your first device: choose a passphrase. It protects your keys "
                   "on the appliance; every other device of yours will ask for it.", err=True)
    return str(click.prompt("Passphrase", hide_input=True, confirmation_prompt=new,
                            err=True))


@cli.command()
@click.argument("code")
@click.option("--url", help="The appliance's address (https://HOST:PORT). Default: find it "
                            "on the LAN by mDNS.")
@click.option("--name", "device_name", default=socket.gethostname(), show_default=True,
              help="This device's name, as the appliance lists it.")
@click.pass_context
def join(ctx: click.Context, code: str, url: str | None, device_name: str) -> None:
    """Join this device to an appliance with a one-time CODE and get your keys.

    The passphrase comes from $CAIRN_PASSPHRASE or a prompt: your first device chooses
    it, later devices need the same one."""
    home = _home(ctx)
    if home.is_enrolled():
        device = home.load_device()
        raise UsageError(f"{home.path} already belongs to device {device.device_name} of "
                         f"user {device.user}; use another --home to join again")
    if (home.path / "device.json").exists():
        raise UsageError("this device joined but has no keys yet: run `cairn unlock`")

    async def run() -> tuple[str, str, bool]:
        device = await enroll(home, code, url, device_name)
        async with Connection(home, device) as connection:
            _, created = await unlock_keys(connection, home, _passphrase)
        return device.user, device.url, created

    user, where, created = _run(run)
    click.echo(f"joined {where} as device {device_name!r} of user {user}")
    if created:
        click.echo("made your keys; every other device of yours needs the same passphrase")


@cli.command()
@click.pass_context
def unlock(ctx: click.Context) -> None:
    """Fetch and open your keys again (after a wrong passphrase during join)."""
    home = _home(ctx)
    device = home.load_device()

    async def run() -> None:
        async with Connection(home, device) as connection:
            await unlock_keys(connection, home, _passphrase)

    _run(run)
    click.echo(f"keys of user {device.user} unlocked on this device")


# --- files -----------------------------------------------------------------------------

@cli.command()
@click.argument("local", type=click.Path(path_type=Path))
@click.argument("remote")
@click.pass_context
def put(ctx: click.Context, local: Path, remote: str) -> None:
    """Upload LOCAL (a file, or a folder with everything in it) to REMOTE.

    Like cp -r: into REMOTE if it is a folder (or ends with /), else as REMOTE. Missing
    folders in REMOTE are made, like mkdir -p (`cairn put a.txt /docs/2026/a.txt` makes
    /docs and /docs/2026); a file in the way is an error. Only blocks the appliance lacks
    are sent, so an interrupted put (Ctrl-C: exit 130, SIGTERM: 143) run again resumes."""
    stats = _in_session(ctx, lambda tree: ops.put(tree, local, remote), resumable=True)
    for path in stats.skipped:
        click.echo(f"cairn: skipped {path} (a symbolic link or special file)", err=True)
    click.echo(f"uploaded {stats.files} file(s), {_size(stats.bytes)}: sent {stats.blocks_sent}"
               f" of {stats.blocks} blocks ({stats.blocks - stats.blocks_sent} were on the "
               "appliance already)")


@cli.command()
@click.argument("remote")
@click.argument("local", type=click.Path(path_type=Path))
@click.pass_context
def get(ctx: click.Context, remote: str, local: Path) -> None:
    """Download REMOTE (a file, or a folder with everything in it) to LOCAL.

    Every block is verified before it is written; the file appears whole or not at all.
    An interrupted get (Ctrl-C: exit 130, SIGTERM: 143) run again fetches only what is
    missing."""
    stats = _in_session(ctx, lambda tree: ops.get(tree, remote, local), resumable=True)
    click.echo(f"downloaded {stats.files} file(s), {_size(stats.bytes)}: fetched "
               f"{stats.blocks_fetched} of {stats.blocks} blocks")


@cli.command("ls")
@click.argument("remote", default="/")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of entries.")
@click.pass_context
def list_command(ctx: click.Context, remote: str, as_json: bool) -> None:
    """List a folder (default: your root), or show one file."""

    async def work(tree: RemoteTree) -> list[RemoteNode]:
        node = await ops.resolve(tree, remote)
        entries = await tree.children(node) if node.is_dir else [node]
        return sorted(entries, key=lambda n: (n.kind != "dir", n.name))

    entries = _in_session(ctx, work)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for entry in entries:
        size = "-" if entry.is_dir else _size(entry.meta.size)
        name = entry.name + ("/" if entry.is_dir else "")
        note = "  (uploading)" if entry.status == "uploading" else ""
        click.echo(f"{size:>10}  {_when(entry.meta.mtime_ns / 1e9)}  {name}{note}")


@cli.command()
@click.argument("remote")
@click.option("-p", "--parents", is_flag=True, help="Make missing parent folders too; no "
                                                   "error if the folder exists.")
@click.pass_context
def mkdir(ctx: click.Context, remote: str, parents: bool) -> None:
    """Create the folder REMOTE."""
    _in_session(ctx, lambda tree: ops.make_folders(tree, remote, parents=parents))


@cli.command()
@click.argument("remote")
@click.option("-r", "--recursive", is_flag=True, help="Remove a folder and its contents.")
@click.pass_context
def rm(ctx: click.Context, remote: str, recursive: bool) -> None:
    """Remove REMOTE. It stays in the appliance's trash for the grace period (7 days by
    default), from where it can be restored (`cairn trash`, `cairn restore`)."""
    _in_session(ctx, lambda tree: ops.remove(tree, remote, recursive=recursive))


@cli.command()
@click.argument("source")
@click.argument("destination")
@click.pass_context
def mv(ctx: click.Context, source: str, destination: str) -> None:
    """Rename or move SOURCE to DESTINATION (into it, if it is a folder). Nothing is
    re-uploaded: a move re-wraps one key."""
    _in_session(ctx, lambda tree: ops.move(tree, source, destination))


# --- trash -----------------------------------------------------------------------------

@cli.command("trash")
@click.option("--all", "expand", is_flag=True,
              help="Also list each item a deleted folder took along.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of entries, newest "
                                                      "first.")
@click.pass_context
def trash_command(ctx: click.Context, expand: bool, as_json: bool) -> None:
    """What was deleted, on any device, newest first: when (local time), file or folder,
    size, and the path it had.

    A folder deleted with everything in it is one line, with the number of items it took
    along (--all lists them too). The appliance keeps deleted items for its grace period
    (7 days by default); bring one back with `cairn restore PATH`."""
    entries = _in_session(ctx, lambda tree: trash_ops.trash(tree, expand=expand))
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    if not entries:
        click.echo("the trash is empty")
    for entry in entries:
        kind = "folder" if entry.kind == "dir" else "file"
        count = entry.items_inside
        inside = f"  (and {count} item{'s' if count != 1 else ''} inside)" if count else ""
        went = f"  (deleted with {entry.deleted_with})" if entry.deleted_with else ""
        click.echo(f"{_when(entry.deleted_at)}  {kind:<6} {_size(entry.size):>10}  "
                   f"{entry.path}{inside}{went}")
    if len([e for e in entries if e.deleted_with is None]) >= trash_ops.TRASH_PAGE:
        click.echo(f"cairn: the appliance lists the newest {trash_ops.TRASH_PAGE} "
                   "deletions only; older ones can still be restored by path", err=True)


@cli.command()
@click.argument("path")
@click.pass_context
def restore(ctx: click.Context, path: str) -> None:
    """Bring back PATH, deleted on any device within the grace period (7 days by default).

    PATH is the path it had, as `cairn trash` shows it (or id:<node id>). If several
    deleted items had that path, the most recently deleted comes back. Its folders come
    back first if they were deleted too, and a folder comes back with everything its
    deletion took along. If a live item now has the same name, both are kept and you are
    told (syncing devices give one a conflicted-copy name)."""
    result = _in_session(ctx, lambda tree: trash_ops.restore(tree, path))
    for line in result.lines():
        click.echo(line)


# --- sharing ---------------------------------------------------------------------------

@cli.command()
@click.argument("remote")
@click.argument("users", nargs=-1, required=True)
@click.pass_context
def share(ctx: click.Context, remote: str, users: tuple[str, ...]) -> None:
    """Let USERS read REMOTE (a folder: everything in it). They find it with
    `cairn shared`. Each user's public key is pinned the first time it is used."""
    node = _in_session(ctx, lambda tree: ops.share(tree, remote, list(users)))
    click.echo(f"shared {node.name} (id:{node.id}) with {', '.join(users)}")


@cli.command()
@click.argument("remote")
@click.argument("user")
@click.pass_context
def unshare(ctx: click.Context, remote: str, user: str) -> None:
    """Stop sharing REMOTE with USER (effective at once for whatever they have not
    downloaded yet)."""
    node = _in_session(ctx, lambda tree: ops.unshare(tree, remote, user))
    click.echo(f"{node.name} is no longer shared with {user}")


@cli.command("shared")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of entries.")
@click.pass_context
def shared_command(ctx: click.Context, as_json: bool) -> None:
    """What other users shared with you. Fetch an entry with `cairn get id:ID LOCAL`."""
    entries = _in_session(ctx, ops.shared)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for entry in entries:
        kind = "folder" if entry.node.is_dir else _size(entry.node.meta.size)
        click.echo(f"id:{entry.node.id}  {entry.owner:<12} {kind:>10}  {entry.node.name}")


# --- status ----------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """This device, its appliance, and whether the appliance answers."""
    home = _home(ctx)
    device = home.load_device()
    keys_present = (home.path / "keys").exists()

    async def probe() -> tuple[Me | None, str | None]:
        async with Connection(home, device) as connection:
            try:
                return await Api(connection).me(), None
            except (TransportError, NotEnrolledError, IncompatibleApplianceError) as exc:
                return None, exc.message

    me, problem = _run_stoppable(probe, resumable=False)
    folders = _sync_folders(home)
    device = home.load_device()   # the address may have changed (rediscovered)
    report = {"home": str(home.path), "user": device.user, "device": device.device_name,
              "device_id": device.device_id, "appliance_id": device.appliance_id,
              "url": device.url, "certificate_sha256": device.fingerprint,
              "keys": keys_present, "reachable": me is not None, "problem": problem,
              "root_id": me.root_id if me else None,
              "latest_cursor": me.latest_cursor if me else None,
              "sync": _sync_records(home)}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"device {device.device_name} ({device.device_id}) of user {device.user}")
    click.echo(f"appliance {device.appliance_id} at {device.url}: "
               + ("reachable" if me else f"NOT reachable — {problem}"))
    if not keys_present:
        click.echo("keys: missing — run `cairn unlock`")
    for line in folders:
        click.echo(line)


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
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
@click.pass_context
def sync(ctx: click.Context, directory: Path, remote_path: str, allow_mass_delete: bool,
         mass_delete_share: float, once: bool, verbose: bool, quiet: bool) -> None:
    """Keep DIR and a folder on the appliance identical, both ways, until stopped.

    Changes here are picked up at once (inotify, plus a full rescan every few minutes);
    changes from other devices arrive through the appliance's event stream. Edits made
    while the appliance is away are kept and sent when it is back. When both sides
    changed a file, the last writer keeps the name and the other version is kept beside
    it as `NAME (conflicted copy from DEVICE DATE TIME).EXT`; an edit beats a delete.
    Deletions arriving from elsewhere can be undone with `cairn restore`. Items others
    shared with you appear under `Shared with me/OWNER/`, read-only.

    Skipped: symbolic links and special files (never followed), editor temporaries, and
    what DIR/.cairnignore lists (gitignore syntax). `cairn status` shows each folder's
    state.

    SIGTERM or Ctrl-C stops it cleanly with exit 0 (a transfer in hand finishes its
    block; what is not done yet is picked up by the next run). With --once, being stopped
    early exits 143 (SIGTERM) or 130 (Ctrl-C), and a pass that paused at a safety check
    exits 11.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else
                        logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "watchfiles", "hypercorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    home = _home(ctx)
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
                try:
                    await engine.run()
                except BaseException:     # stopped (a signal) or failed: say so last
                    _mark_stopped(db, folder.local_dir)
                    raise
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
            raise _interrupted(outcome, resumable=True)
        click.echo(f"stopped syncing {local_dir} ({outcome.name})", err=True)


def _mark_stopped(db: SyncDb, local_dir: str) -> None:
    """The folder's last status: no agent is syncing it (its counts kept)."""
    record = db.folder(local_dir)
    if record is not None:
        db.set_status(record.id, "stopped", "", record.pending, record.conflicts)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_records(home: AgentHome) -> list[dict[str, Any]]:
    if not (home.path / DB_FILE).exists():
        return []
    db = SyncDb.of_home(home.path)
    try:
        return [{"dir": r.local_dir, "remote": r.remote_path,
                 "state": r.state if r.pid and _process_alive(r.pid) else "not running",
                 "detail": r.detail, "pending": r.pending, "conflicts": r.conflicts,
                 "updated_at": r.updated_at} for r in db.folders()]
    finally:
        db.close()


def _sync_folders(home: AgentHome) -> list[str]:
    if not (home.path / DB_FILE).exists():
        return []
    db = SyncDb.of_home(home.path)
    try:
        return ["sync " + describe(r, _process_alive) for r in db.folders()]
    finally:
        db.close()


def main() -> None:
    cli(prog_name="cairn")


if __name__ == "__main__":
    main()
