"""`cairnd`, the appliance's command line (click).

Every command takes `--home DIR`, or the CAIRN_APPLIANCE_HOME environment variable.
Errors the appliance raises on purpose (appliance.errors) become one line on stderr —
`cairnd: error: MESSAGE` — and the error's exit code; never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from appliance.cli_accounts import register as register_account_commands
from appliance.cli_fsck import register as register_fsck_command
from appliance.config import parse_listen
from appliance.errors import CairnApplianceError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_UNRECOVERABLE = 4
EXIT_INTERRUPTED = 130
HOME_ENV = "CAIRN_APPLIANCE_HOME"


class _Group(click.Group):
    """Turns our errors (and OS errors such as a permission denied) into one stderr line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CairnApplianceError as exc:
            click.echo(f"cairnd: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"cairnd: error: {exc.strerror or exc}{where}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("cairnd: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


def home_option(f: F) -> F:
    return click.option(
        "--home", "home", required=True, envvar=HOME_ENV, show_envvar=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="The appliance home folder (config.toml, database, TLS files).",
    )(f)


def _listen(value: str | None) -> tuple[str, int] | None:
    return None if value is None else parse_listen(value)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(package_name="cairn", prog_name="cairnd")
def cli() -> None:
    """Cairn appliance: stores everyone's files, end-to-end encrypted, on erasure-coded
    local disks, and serves them to Cairn agents over HTTPS.

    \b
    Examples:
      cairnd init --home /var/lib/cairn                 six disk folders, 4+2 shards
      cairnd init --home /var/lib/cairn --listen 192.168.1.10:8443 \\
          --disk-path /srv/disk0 ... --disk-path /srv/disk5
      cairnd serve --home /var/lib/cairn                until SIGTERM / Ctrl-C
      cairnd disks --home /var/lib/cairn                state and free space per disk
      cairnd scrub --home /var/lib/cairn                verify and repair every block
      cairnd fsck --home /var/lib/cairn                 the database against the store
      cairnd stats --home /var/lib/cairn                what the serving appliance served
      cairnd recover --home /var/lib/cairn --disk-path /srv/disk0 ...
                                                        the system disk died: rebuild
      cairnd user add alice --home /var/lib/cairn       prints alice's enrollment code
      cairnd device revoke dev_0123abcd --home ...      a lost laptop

    Every --home may instead come from CAIRN_APPLIANCE_HOME.
    """


@cli.command()
@home_option
@click.option("--disks", type=int, default=None, metavar="N",
              help="Number of disk folders to make under HOME/disks.  [default: 6]")
@click.option("--data-shards", type=int, default=4, show_default=True, metavar="K",
              help="Data shards per block: any K shards rebuild it.")
@click.option("--parity-shards", type=int, default=2, show_default=True, metavar="M",
              help="Parity shards per block: up to M disks may fail at once.")
@click.option("--listen", default="127.0.0.1:8443", show_default=True, metavar="HOST:PORT",
              help="Address the HTTPS API will listen on ([IPV6]:PORT for IPv6).")
@click.option("--disk-path", "disk_paths", multiple=True, metavar="PATH",
              type=click.Path(path_type=Path),
              help="Use this existing folder or mount point as a disk instead of making "
                   "folders; repeat once per disk. Mount points get require_mount = true.")
@click.option("--no-serve-hint", is_flag=True,
              help="Leave out the closing `Start it with: cairnd serve ...` line (for "
                   "scripts that start it next, such as `make run`).")
def init(home: Path, disks: int | None, data_shards: int, parity_shards: int, listen: str,
         disk_paths: Sequence[Path], no_serve_hint: bool) -> None:
    """Create a new appliance home: config.toml, disks, database, TLS certificate.

    Refuses a HOME that already holds an appliance or any other files.

    \b
    Examples:
      cairnd init --home ./var/appliance
      cairnd init --home /var/lib/cairn --disks 8 --data-shards 5 --parity-shards 3
    """
    from appliance.home import init_home
    from appliance.tls import read_certificate_fingerprint

    config = init_home(home, disks=disks, data_shards=data_shards,
                       parity_shards=parity_shards, listen=listen,
                       disk_paths=list(disk_paths) or None)
    store = config.store
    fingerprint = read_certificate_fingerprint(config.tls_certificate)
    click.echo(f"cairnd: created appliance {config.appliance_id} in {config.home}")
    click.echo(f"  disks:       {len(store.disks)} "
               f"({store.data_shards} data + {store.parity_shards} parity shards per block)")
    for disk in store.disks:
        mount = " (mount point)" if disk.require_mount else ""
        click.echo(f"    {disk.name:<8} {disk.path}{mount}")
    click.echo(f"  listen:      https://{config.listen}")
    click.echo(f"  certificate: sha256 {fingerprint}")
    click.echo(f"  config:      {config.config_path}")
    if not no_serve_hint:
        click.echo(f"Start it with: cairnd serve --home {config.home}")


@cli.command()
@home_option
@click.option("--listen", default=None, metavar="HOST:PORT",
              help="Listen here instead of the configured address for this run "
                   "(port 0: any free port).")
@click.option("--next-steps", is_flag=True,
              help="Once listening, also print the commands that add a user and join "
                   "this machine as their device (`make run` does).")
def serve(home: Path, listen: str | None, next_steps: bool) -> None:
    """Run the appliance: HTTPS API and background scrub, until SIGTERM or Ctrl-C.

    Once listening it prints one line on stdout:
    `cairnd: serving https://HOST:PORT (appliance ID, certificate sha256 FINGERPRINT)`
    (with --next-steps, a few `cairnd:` lines of what to do next follow it) and writes
    HOME/run/serve.json. Logs go to stderr.

    \b
    Examples:
      cairnd serve --home /var/lib/cairn
      cairnd serve --home ./var/appliance --listen 127.0.0.1:0
    """
    from appliance.next_steps import next_steps as steps
    from appliance.next_steps import program_dir
    from appliance.serve import ServeInfo
    from appliance.serve import serve as run_server

    def after_start(info: ServeInfo) -> list[str]:
        return steps(home, info.host, info.port, program_dir(sys.argv[0]))

    run_server(home, _listen(listen), after_start=after_start if next_steps else None)


def _human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


def disk_table(rows: Sequence[dict[str, Any]]) -> str:
    """The `cairnd disks` table, from DiskStatus.to_json() dicts."""
    header = ("NAME", "STATE", "SHARDS", "FREE", "SIZE", "PATH")
    lines = [header] + [
        (row["name"], row["state"],
         "-" if row.get("shard_count") is None else str(row["shard_count"]),
         _human_bytes(row.get("free_bytes")), _human_bytes(row.get("total_bytes")),
         row["path"])
        for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = []
    for line in lines:
        cells = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                 for i, cell in enumerate(line[:-1])]
        text.append("  ".join([*cells, line[-1]]))
    for row in rows:
        if row.get("detail") and row["state"] != "ok":
            text.append(f"{row['name']}: {row['detail']}")
    return "\n".join(text)


@cli.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def disks(home: Path, as_json: bool) -> None:
    """Show each disk: name, state, shard count, free space, path.

    States: ok, missing (absent or not mounted), blank (an empty replacement: run
    `cairnd scrub` to rebuild it), read-only, full, failing (recent I/O errors), foreign
    (belongs to another appliance or holds other files). While the appliance serves, its
    own view is shown (asked through its admin socket).
    """
    from appliance.admin_client import run_store_command

    result, _ = run_store_command(home, "disks", {}, no_progress)
    rows = result["disks"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(disk_table(rows))


def no_progress(fields: dict[str, Any]) -> None:
    pass


class ProgressLine:
    """A self-overwriting progress line on a terminal's stderr, at most a few per second,
    from the progress fields a store command reports (`render` makes the text)."""

    def __init__(self, render: Callable[[dict[str, Any]], str]) -> None:
        self.render = render
        self.last = 0.0
        self.shown = False

    def __call__(self, fields: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        sys.stderr.write(f"\r{self.render(fields)}\x1b[K")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_and_report(home: Path, command: str, args: dict[str, Any], as_json: bool,
                   render: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Run a store command that reports (scrub, fsck) where it belongs, with a progress
    line on a terminal's stderr (RENDER makes it), and print its report as JSON or its
    summary line; the report."""
    from appliance.admin_client import run_store_command
    from appliance.serve import configure_logging

    configure_logging(logging.WARNING)
    progress = ProgressLine(render) if sys.stderr.isatty() else None
    try:
        result, _ = run_store_command(home, command, args, progress or no_progress)
    finally:
        if progress is not None:
            progress.finish()
    report: dict[str, Any] = result["report"]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"cairnd: {command}: {result['summary']}")
    return report


@cli.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def scrub(home: Path, as_json: bool) -> None:
    """Verify every shard of every block; rewrite missing or corrupt shards, and rebuild
    blank replacement disks. While the appliance serves, the scrub runs inside it (through
    its admin socket, so one process owns the disks); otherwise here.

    Prints a summary (checked, repaired, unrecoverable) on stdout, with progress on stderr
    when it is a terminal. Exits 4 if any block is unrecoverable.
    """
    report = run_and_report(home, "scrub", {}, as_json, lambda f: (
        f"scrub: {f['checked']} blocks checked, {f['bytes_verified'] / 1e6:.1f} MB verified, "
        f"{f['elapsed']:.0f} s"))
    if report["unrecoverable"]:
        if not as_json:
            click.echo(f"cairnd: error: {report['unrecoverable']} blocks are unrecoverable "
                       "with the disks present; reattach any missing disk and scrub again",
                       err=True)
        sys.exit(EXIT_UNRECOVERABLE)


@cli.command()
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the counters as JSON.")
def stats(home: Path, as_json: bool) -> None:
    """What the serving appliance did since it started: blocks and bytes it served
    (download URLs and batch reads), device certificates signed, block grants issued and
    devices admitted from the LAN. Asked through its admin socket: the counters live in
    the `cairnd serve` process, so this fails (exit 3) when it is not running.
    """
    from appliance.admin import socket_path
    from appliance.admin_client import ask_server
    from appliance.config import load_config
    from appliance.errors import AdminError
    from appliance.stats import render_stats

    config = load_config(home)
    result = ask_server(config.home, "stats", {}, no_progress)
    if result is None:
        raise AdminError(f"the appliance in {config.home} is not serving (nothing answers "
                         f"on {socket_path(config.home)}); its counters exist only while "
                         "`cairnd serve` runs", exit_code=3)
    click.echo(json.dumps(result, indent=2) if as_json else render_stats(result))


@cli.command()
@home_option
@click.option("--disk-path", "disk_paths", multiple=True, required=True, metavar="PATH",
              type=click.Path(path_type=Path),
              help="A disk of the lost appliance (its folder or mount point); repeat once "
                   "per disk, in any order.")
def recover(home: Path, disk_paths: Sequence[Path]) -> None:
    """Rebuild a lost appliance home from the copies kept on its data disks.

    While it serves, the appliance keeps copies of its home (database, config, TLS key
    pair, secrets) on parity-shards + 1 of its disks. This writes a new home in HOME
    (absent or empty) from the newest intact copy: the same appliance id, certificate
    (devices keep their pins), users, devices, shares and files. Devices that saw changes
    newer than the copy send them again when they next connect.

    \b
    Example (the system disk died; the data disks are mounted again):
      cairnd recover --home /var/lib/cairn --disk-path /srv/disk0 ... --disk-path /srv/disk5
      cairnd serve --home /var/lib/cairn
    """
    from appliance.recover import age_text, recover_home

    result = recover_home(home, list(disk_paths))
    config = result.config
    click.echo(f"cairnd: recovered appliance {config.appliance_id} in {config.home}")
    click.echo(f"  from:        {result.copy} (copy {result.sequence}, written "
               f"{age_text(result.written_at)} ago"
               f"{', at a clean stop' if result.clean_stop else ''})")
    for line in result.skipped:
        click.echo(f"  skipped:     {line}")
    for disk in config.store.disks:
        note = "  (not given: attach it, or a new empty disk here is rebuilt by scrub)" \
            if disk.name in result.missing_slots else ""
        click.echo(f"    {disk.name:<8} {disk.path}{note}")
    click.echo(f"  new epoch:   {result.epoch} (devices re-send what the copy lacks)")
    click.echo(f"Start it with: cairnd serve --home {config.home}")


register_account_commands(cli, home_option)
register_fsck_command(cli, home_option)


def main() -> None:
    with contextlib.suppress(BrokenPipeError):
        cli(prog_name="cairnd")


if __name__ == "__main__":
    main()
