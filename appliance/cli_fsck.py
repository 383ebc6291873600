"""`cairnd fsck`: check the database against the block store, and with --repair fix it
(appliance/fsck.py has what is checked and how each problem is repaired).

The work is one call, `appliance.fsck.fsck_command`, which gives the same JSON-ready result
whether it runs here or inside a serving appliance. Here it holds the home's owner lock
(appliance/owner.py) so that no server starts under it. While a server runs, a plain check
runs beside it (reads, plus its own bookkeeping of orphans and the repair queue) and
--repair is refused: repairs beside a server would race its uploads and GC without its
per-block locks.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from appliance.config import ApplianceConfig, load_config
from appliance.errors import HomeBusyError

EXIT_PROBLEMS = 4


def _no_progress(fields: dict[str, Any]) -> None:
    pass


def _run_here(config: ApplianceConfig, args: dict[str, Any],
              progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    from appliance.fsck import fsck_command
    from appliance.storage.blockstore import BlockStore
    from appliance.storage.repair_queue import RepairQueue

    store = BlockStore(config.store, RepairQueue(config.database))
    try:
        return fsck_command(config, store, args, progress)
    finally:
        store.close()


def run_fsck_command(home: Path, args: dict[str, Any],
                     progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """fsck_command's result for HOME: under the owner lock, or beside a running server
    without repairs (see the module doc)."""
    from appliance.owner import own_disks

    config = load_config(home)
    try:
        with own_disks(config.home, "cairnd fsck"):
            return _run_here(config, args, progress)
    except HomeBusyError as exc:
        if args.get("repair"):
            raise HomeBusyError(f"{exc.message}: stop it to run `cairnd fsck --repair` "
                                "(a check without --repair runs beside it)") from None
        click.echo(f"cairnd: fsck: {exc.message}; checking beside it, without repairs",
                   err=True)
    return _run_here(config, args, progress)


def register(cli: click.Group, home_option: Callable[[Callable[..., None]],
                                                     Callable[..., None]]) -> None:
    @cli.command()
    @home_option
    @click.option("--repair", is_flag=True,
                  help="Fix what is found (each fix is described in the report).")
    @click.option("--verify", is_flag=True,
                  help="Read and decode every referenced block in full instead of "
                       "reading its shard headers (as slow as reading all the data).")
    @click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
    def fsck(home: Path, repair: bool, verify: bool, as_json: bool) -> None:
        """Check the database against the block store: every block a file needs is
        stored and decodable (degraded ones are queued for repair), reference counts are
        right, no file is `uploaded` with a block missing, and blocks in the store that
        the database does not know (orphans, left by a crash) are listed.

        \b
        With --repair: counts and rows are corrected; a file whose block is lost goes
        back to `uploading`, so that a device holding it sends the block again; an
        orphan is deleted once first seen longer ago than the GC grace period (each run
        records when it first saw each). Without --repair nothing is changed but that
        record and the repair queue. --repair needs the appliance stopped.

        \b
        Exit status: 0 clean (nothing wrong, or all of it repaired); 4 problems remain;
        3 another cairnd owns the home (--repair while serving); 2 bad home or config.
        Notices (degraded blocks, orphans, uploads a crash interrupted) do not count as
        problems. Progress goes to stderr when it is a terminal.

        \b
        Examples:
          cairnd fsck --home /var/lib/cairn
          cairnd fsck --home /var/lib/cairn --repair --json
        """
        from appliance.cli import ProgressLine
        from appliance.serve import configure_logging

        configure_logging(logging.WARNING)
        progress = ProgressLine(lambda f: f"fsck: {f['phase']}: {f['done']} checked, "
                                          f"{f['elapsed']:.0f} s") \
            if sys.stderr.isatty() else None
        try:
            result = run_fsck_command(home, {"repair": repair, "verify": verify},
                                      progress or _no_progress)
        finally:
            if progress is not None:
                progress.finish()
        report = result["report"]
        if as_json:
            click.echo(json.dumps(report, indent=2))
        else:
            click.echo(f"cairnd: fsck: {result['summary']}")
        if not report["clean"]:
            sys.exit(EXIT_PROBLEMS)
