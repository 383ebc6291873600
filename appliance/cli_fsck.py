"""`cairnd fsck`: check the database against the block store, and with --repair fix it
(appliance/fsck.py has what is checked and how each problem is repaired).

The work is one call, `appliance.fsck.fsck_command`, which gives the same JSON-ready result
wherever it runs: inside a serving appliance (through its admin socket, under its per-block
locks, so repairs never race an upload or GC of the same block), or here, holding the home's
owner lock (appliance/owner.py) so that no server starts under it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

EXIT_PROBLEMS = 4


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
        record and the repair queue. While the appliance serves, fsck runs inside it.

        \b
        Exit status: 0 clean (nothing wrong, or all of it repaired); 4 problems remain;
        3 another cairnd owns the home and does not answer; 2 bad home or config.
        Notices (degraded blocks, orphans, uploads a crash interrupted) do not count as
        problems. Progress goes to stderr when it is a terminal.

        \b
        Examples:
          cairnd fsck --home /var/lib/cairn
          cairnd fsck --home /var/lib/cairn --repair --json
        """
        from appliance.cli import run_and_report

        report = run_and_report(home, "fsck", {"repair": repair, "verify": verify}, as_json,
                                lambda f: f"fsck: {f['phase']}: {f['done']} checked, "
                                          f"{f['elapsed']:.0f} s")
        if not report["clean"]:
            sys.exit(EXIT_PROBLEMS)
