"""Joining this device, unlocking its keys, and `cairn status`."""

from __future__ import annotations

import json
import os
import socket
import sys

import click

from agent.api import Api
from agent.cli.pairing import pending_section
from agent.cli.shell import cli, home_of, run_prompting, run_stoppable, status_sections
from agent.cli.sync import sync_folders, sync_records
from agent.client import Connection
from agent.enroll import enroll, unlock_keys
from agent.errors import (
    IncompatibleApplianceError,
    NotEnrolledError,
    TransportError,
    UsageError,
)
from agent.pairing.request import join_lan
from protocol.models import Me

PASSPHRASE_ENV = "CAIRN_PASSPHRASE"


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
@click.argument("code", required=False)
@click.option("--url", help="The appliance's address (https://HOST:PORT). Default: find it "
                            "on the LAN by mDNS.")
@click.option("--name", "device_name", default=socket.gethostname(), show_default=True,
              help="This device's name, as the appliance lists it.")
@click.option("--lan", is_flag=True, help="No code: ask your other devices on this network "
                                          "to let this one in (`cairn approve NAME` there).")
@click.pass_context
def join(ctx: click.Context, code: str | None, url: str | None, device_name: str,
         lan: bool) -> None:
    """Join this device to an appliance with a one-time CODE and get your keys.

    The passphrase comes from $CAIRN_PASSPHRASE or a prompt: your first device chooses
    it, later devices need the same one. With --lan, one of your devices approves this
    one instead, and nothing is typed here."""
    home = home_of(ctx)
    if home.is_enrolled():
        device = home.load_device()
        raise UsageError(f"{home.path} already belongs to device {device.device_name} of "
                         f"user {device.user}; use another --home to join again")
    if (home.path / "device.json").exists():
        raise UsageError("this device joined but has no keys yet: run `cairn unlock`")
    if lan:
        if code is not None or url is not None:
            raise UsageError("--lan takes no code and no --url: your other device knows "
                             "the appliance")
        joined = run_stoppable(lambda: join_lan(home, device_name, click.echo),
                               resumable=False)
        click.echo(f"Joined as {joined.device_name} (user {joined.user}) to appliance "
                   f"{joined.appliance_id}, certificate {joined.fingerprint[:16]}…. If the "
                   "device you approved on did not say it admitted this one, this is not "
                   "your appliance: delete this home and run `cairn join --lan` again.")
        return
    if code is None:
        raise UsageError("give the one-time code (`cairnd user add` or `cairnd user code` "
                         "prints it), or --lan to be let in by one of your devices")

    async def run() -> tuple[str, str, bool]:
        device = await enroll(home, code, url, device_name)
        async with Connection(home, device) as connection:
            _, created = await unlock_keys(connection, home, _passphrase)
        return device.user, device.url, created

    user, where, created = run_prompting(run)
    click.echo(f"joined {where} as device {device_name!r} of user {user}")
    if created:
        click.echo("made your keys; every other device of yours needs the same passphrase")


@cli.command()
@click.pass_context
def unlock(ctx: click.Context) -> None:
    """Fetch and open your keys again (after a wrong passphrase during join)."""
    home = home_of(ctx)
    device = home.load_device()

    async def run() -> None:
        async with Connection(home, device) as connection:
            await unlock_keys(connection, home, _passphrase)

    run_prompting(run)
    click.echo(f"keys of user {device.user} unlocked on this device")


# --- status ----------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@click.option("--pending", is_flag=True, help="Also look for devices asking to join on this "
                                              "network (about 2 s; `cairn devices pending`).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, pending: bool) -> None:
    """This device, its appliance, and whether the appliance answers."""
    home = home_of(ctx)
    device = home.load_device()
    keys_present = (home.path / "keys").exists()

    async def probe() -> tuple[Me | None, str | None]:
        async with Connection(home, device) as connection:
            try:
                return await Api(connection).me(), None
            except (TransportError, NotEnrolledError, IncompatibleApplianceError) as exc:
                return None, exc.message

    me, problem = run_stoppable(probe, resumable=False)
    folders = sync_folders(home)
    device = home.load_device()   # the address may have changed (rediscovered)
    report = {"home": str(home.path), "user": device.user, "device": device.device_name,
              "device_id": device.device_id, "appliance_id": device.appliance_id,
              "url": device.url, "certificate_sha256": device.fingerprint,
              "keys": keys_present, "reachable": me is not None, "problem": problem,
              "root_id": me.root_id if me else None,
              "latest_cursor": me.latest_cursor if me else None,
              "sync": sync_records(home)}
    sections = [section(home) for section in status_sections]
    if pending:
        sections.append(pending_section(home))
    for key, value, _ in sections:
        report[key] = value
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
    for _, _, lines in sections:
        for line in lines:
            click.echo(line)
