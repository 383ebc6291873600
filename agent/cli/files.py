"""Files on the appliance: put, get, ls, mkdir, rm, mv; the trash; sharing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from agent import operations as ops
from agent import trash as trash_ops
from agent.cli.shell import cli, in_session, size_text, when_text
from agent.download import DownloadStats
from agent.peers.transfer import lone_access
from agent.remote import RemoteNode, RemoteTree

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
    stats = in_session(ctx, lambda tree: ops.put(tree, local, remote), resumable=True)
    for path in stats.skipped:
        click.echo(f"cairn: skipped {path} (a symbolic link or special file)", err=True)
    click.echo(f"uploaded {stats.files} file(s), {size_text(stats.bytes)}: sent {stats.blocks_sent}"
               f" of {stats.blocks} blocks ({stats.blocks - stats.blocks_sent} were on the "
               "appliance already)")


@cli.command()
@click.argument("remote")
@click.argument("local", type=click.Path(path_type=Path))
@click.option("--no-peers", is_flag=True, help="Fetch from the appliance only, not from "
                                               "your other devices on the LAN.")
@click.pass_context
def get(ctx: click.Context, remote: str, local: Path, no_peers: bool) -> None:
    """Download REMOTE (a file, or a folder with everything in it) to LOCAL.

    Every block is verified before it is written; the file appears whole or not at all.
    An interrupted get (Ctrl-C: exit 130, SIGTERM: 143) run again fetches only what is
    missing. Blocks also come from your other devices on the LAN that hold them (unless
    --no-peers, or `[peers] enabled = false` in the agent's config.toml); each is checked
    the same way, and a device that sends a wrong one is not asked again."""

    async def work(tree: RemoteTree) -> DownloadStats:
        tree.peers = None if no_peers else lone_access(tree.home, tree.api)
        try:
            return await ops.get(tree, remote, local)
        finally:
            if tree.peers is not None:
                tree.peers.close()

    stats = in_session(ctx, work, resumable=True)
    peers = f", {stats.blocks_from_peers} from peers" if stats.blocks_from_peers else ""
    click.echo(f"downloaded {stats.files} file(s), {size_text(stats.bytes)}: fetched "
               f"{stats.blocks_fetched} of {stats.blocks} blocks{peers}")


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

    entries = in_session(ctx, work)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for entry in entries:
        size = "-" if entry.is_dir else size_text(entry.meta.size)
        name = entry.name + ("/" if entry.is_dir else "")
        note = "  (uploading)" if entry.status == "uploading" else ""
        click.echo(f"{size:>10}  {when_text(entry.meta.mtime_ns / 1e9)}  {name}{note}")


@cli.command()
@click.argument("remote")
@click.option("-p", "--parents", is_flag=True, help="Make missing parent folders too; no "
                                                   "error if the folder exists.")
@click.pass_context
def mkdir(ctx: click.Context, remote: str, parents: bool) -> None:
    """Create the folder REMOTE."""
    in_session(ctx, lambda tree: ops.make_folders(tree, remote, parents=parents))


@cli.command()
@click.argument("remote")
@click.option("-r", "--recursive", is_flag=True, help="Remove a folder and its contents.")
@click.pass_context
def rm(ctx: click.Context, remote: str, recursive: bool) -> None:
    """Remove REMOTE. It stays in the appliance's trash for the grace period (7 days by
    default), from where it can be restored (`cairn trash`, `cairn restore`)."""
    in_session(ctx, lambda tree: ops.remove(tree, remote, recursive=recursive))


@cli.command()
@click.argument("source")
@click.argument("destination")
@click.pass_context
def mv(ctx: click.Context, source: str, destination: str) -> None:
    """Rename or move SOURCE to DESTINATION (into it, if it is a folder). Nothing is
    re-uploaded: a move re-wraps one key."""
    in_session(ctx, lambda tree: ops.move(tree, source, destination))


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
    entries = in_session(ctx, lambda tree: trash_ops.trash(tree, expand=expand))
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
        click.echo(f"{when_text(entry.deleted_at)}  {kind:<6} {size_text(entry.size):>10}  "
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
    result = in_session(ctx, lambda tree: trash_ops.restore(tree, path))
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
    node = in_session(ctx, lambda tree: ops.share(tree, remote, list(users)))
    click.echo(f"shared {node.name} (id:{node.id}) with {', '.join(users)}")


@cli.command()
@click.argument("remote")
@click.argument("user")
@click.pass_context
def unshare(ctx: click.Context, remote: str, user: str) -> None:
    """Stop sharing REMOTE with USER (effective at once for whatever they have not
    downloaded yet)."""
    node = in_session(ctx, lambda tree: ops.unshare(tree, remote, user))
    click.echo(f"{node.name} is no longer shared with {user}")


@cli.command("shared")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of entries.")
@click.pass_context
def shared_command(ctx: click.Context, as_json: bool) -> None:
    """What other users shared with you. Fetch an entry with `cairn get id:ID LOCAL`."""
    entries = in_session(ctx, ops.shared)
    if as_json:
        click.echo(json.dumps([e.to_json() for e in entries], indent=2))
        return
    for entry in entries:
        kind = "folder" if entry.node.is_dir else size_text(entry.node.meta.size)
        click.echo(f"id:{entry.node.id}  {entry.owner:<12} {kind:>10}  {entry.node.name}")
