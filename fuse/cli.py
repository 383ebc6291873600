"""The drive's commands, added to `cairn` through the `cairn.commands` entry point (the
agent's command line never imports this package): `cairn mount`, `cairn umount`, `cairn
pin`, `cairn unpin`, `cairn free`, and the drive's lines in `cairn status`."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
import trio

from agent.cli.shell import home_of, size_text
from agent.errors import LocalFileError, UsageError
from agent.home import AgentHome

PIN = "user.cairn.pin"
FREE = "user.cairn.free"
STATE = "user.cairn.state"


def register(cli: click.Group, status_sections: list[Any]) -> None:
    for command in (mount, umount, pin, unpin, free):
        cli.add_command(command)
    status_sections.append(drive_status)


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--cache-size", default="4G", show_default=True, metavar="SIZE",
              help="The most disk the drive uses for cached blocks and unsent writes "
                   "(K, M, G, T). When pinned files and unsent writes fill it, writes "
                   "fail with 'no space left' rather than filling the disk.")
@click.option("--no-peers", is_flag=True,
              help="Do not serve cached blocks to this user's other devices on the LAN "
                   "(also `[peers] enabled = false` in HOME/config.toml).")
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
@click.option("-q", "--quiet", is_flag=True, help="Log only warnings and errors.")
@click.pass_context
def mount(ctx: click.Context, mountpoint: Path, cache_size: str, no_peers: bool,
          verbose: bool, quiet: bool) -> None:
    """Show your files as a drive at MOUNTPOINT (an empty folder), until unmounted.

    Listings come from a local index, so they are instant and work offline; a file's
    blocks are fetched when it is read and kept in a local cache. Writes are kept
    locally first and uploaded shortly after the file is closed; `fsync` returns once
    they are safe on this disk. Changes from other devices show up within seconds.
    `getfattr -n user.cairn.state FILE` says where a file stands (cloud, cached, pinned,
    dirty, uploading, conflict); `cairn pin` keeps files available offline.

    Runs in the foreground (suits systemd). `cairn umount MOUNTPOINT`, SIGTERM or
    Ctrl-C unmount it and finish the pending uploads first (when the appliance is away
    they stay staged and go at the next mount). Symbolic links are kept as links
    (never followed); hard links and special files are refused (EPERM).

    While mounted, cached blocks are served to this user's other devices on the LAN
    (mutual TLS, and only against a grant the appliance issued for those blocks).
    """
    if importlib.util.find_spec("pyfuse3") is None:
        raise UsageError("the drive's packages are not installed (pyfuse3); install them "
                         "with pip install 'cairn[fuse]' (and apt-get install fuse3)")
    from fuse.mount import MountOptions, parse_size, run_mount

    logging.basicConfig(level=logging.DEBUG if verbose else
                        logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "hypercorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    options = MountOptions(mountpoint, parse_size(cache_size), peers=not no_peers)
    left = trio.run(run_mount, home_of(ctx), options)
    if left:
        ctx.exit(75)       # EX_TEMPFAIL: changes stay staged for the next mount


@click.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("--lazy", is_flag=True, help="Detach now even if a program still has a "
                                            "file open there.")
def umount(mountpoint: Path, lazy: bool) -> None:
    """Unmount the drive at MOUNTPOINT; its `cairn mount` uploads what is pending and
    exits."""
    from fuse.mountpoint import unmount

    unmount(mountpoint, lazy=lazy)


def _on_drive(path: Path) -> Path:
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    try:
        os.getxattr(path, STATE)
    except OSError:
        raise UsageError(f"{path} is not on a mounted Cairn drive") from None
    return path


def _set(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value)
    except OSError as exc:
        raise LocalFileError(f"{path}: {exc.strerror}") from None


def _files_under(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    return [Path(root) / name for root, _, names in os.walk(path) for name in names]


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--no-wait", is_flag=True, help="Return at once; the blocks are fetched "
                                               "in the background.")
def pin(path: Path, no_wait: bool) -> None:
    """Keep PATH (a file or folder on the drive, and everything under it, including
    files added later) available offline: its blocks are fetched now and never evicted
    from the cache."""
    _set(_on_drive(path), PIN, b"1")
    if no_wait:
        return
    files = _files_under(path)
    deadline = time.monotonic() + 24 * 3600
    while time.monotonic() < deadline:
        states = [os.getxattr(f, STATE).decode() for f in files]
        ready = sum(s in ("pinned", "dirty", "uploading") for s in states)
        if ready == len(files):
            click.echo(f"pinned {path}: {len(files)} file(s) available offline")
            return
        time.sleep(0.2)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
def unpin(path: Path) -> None:
    """Let PATH's blocks be evicted again when the cache needs room."""
    _set(_on_drive(path), PIN, b"0")


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
def free(path: Path) -> None:
    """Drop the cached blocks of PATH's files now (files not uploaded yet and pinned
    ones stay); they are fetched again when read."""
    _set(_on_drive(path), FREE, b"1")


def drive_status(home: AgentHome) -> tuple[str, Any, list[str]]:
    from fuse.mount import drive_folder
    from fuse.status import read_status

    status = read_status(drive_folder(home))
    if status is None:
        return "drive", None, []
    lines = [f"drive mounted at {status.mountpoint} (pid {status.pid}): "
             + ("appliance reachable" if status.online else "appliance NOT reachable")
             + f"; {status.pending} change(s) to upload"
             + (f", {status.conflicts} in conflict" if status.conflicts else "")]
    for upload in status.uploads:
        lines.append(f"  uploading {upload.name}: {size_text(upload.done)} of "
                     f"{size_text(upload.total)}")
    for name in status.queued[:10]:
        if all(name != u.name for u in status.uploads):
            lines.append(f"  queued {name}")
    lines.append(f"  cache {size_text(status.cache_used)} ({size_text(status.cache_pinned)}"
                 f" pinned) + {size_text(status.staged)} unsent, of "
                 f"{size_text(status.cache_budget)}")
    return "drive", asdict(status), lines
