"""Admitting a device from this one: `cairn approve NAME`, `cairn devices pending`,
`cairn devices ignore NAME` (agent/pairing). `cairn join --lan`, the other side, is with
`cairn join` in device.py."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from agent.cli.shell import cli, home_of, run_prompting, run_stoppable
from agent.errors import TransportError, UsageError
from agent.home import AgentHome
from agent.pairing.approve import approve as approve_request
from agent.pairing.pending import FoundRequest, find_requests, ignore

STATUS_BROWSE_S = 2.0


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe(request: FoundRequest, now: float) -> dict[str, object]:
    return {"name": request.info.device_name, "age_s": round(now - request.info.created_at),
            "expires_in_s": round(request.info.expires_at - now),
            "key_sha256": request.key_sha256, "url": request.url}


def pending_section(home: AgentHome) -> tuple[str, Any, list[str]]:
    """`cairn status --pending`: how many devices ask to join here (a 2 s search)."""
    try:
        found = run_stoppable(lambda: find_requests(home, STATUS_BROWSE_S), resumable=False)
    except TransportError as exc:
        return "join_requests", None, [f"join requests: cannot look ({exc.message})"]
    now = time.time()
    names = ", ".join(r.info.device_name for r in found)
    line = (f"join requests: {len(found)} pending ({names}) — `cairn approve NAME`"
            if found else "join requests: none")
    return "join_requests", [describe(r, now) for r in found], [line]


@cli.group()
def devices() -> None:
    """Devices asking to join on this network (`cairn join --lan` on them)."""


@devices.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@click.pass_context
def pending(ctx: click.Context, as_json: bool) -> None:
    """List the devices asking to join on this network (a few seconds' search)."""
    home = home_of(ctx)
    home.load_device()          # only a joined device can approve: say so first
    found = run_stoppable(lambda: find_requests(home), resumable=False)
    now = time.time()
    if as_json:
        click.echo(json.dumps([describe(r, now) for r in found], indent=2))
        return
    if not found:
        click.echo("no device is asking to join on this network")
        return
    for request in found:
        click.echo(f"{request.info.device_name}  asked {_age(now - request.info.created_at)} "
                   f"ago, expires in {_age(request.info.expires_at - now)}  "
                   f"(cairn approve {request.info.device_name})")


@devices.command(name="ignore")
@click.argument("name")
@click.pass_context
def ignore_request(ctx: click.Context, name: str) -> None:
    """Stop listing the request of NAME (this device, this key)."""
    home = home_of(ctx)
    home.load_device()
    found = run_stoppable(lambda: find_requests(home, include_ignored=True),
                          resumable=False)
    named = [r for r in found if r.info.device_name == name]
    if not named:
        raise UsageError(f"no device named {name!r} is asking to join on this network")
    for request in named:
        ignore(home, request)
    click.echo(f"ignoring {name}'s request" + (f" ({len(named)} of them)"
                                                if len(named) > 1 else ""))


@cli.command()
@click.argument("name")
@click.option("--code", help="The 6-digit code NAME shows (else you are asked for it).")
@click.pass_context
def approve(ctx: click.Context, name: str, code: str | None) -> None:
    """Let NAME in: a device of yours that runs `cairn join --lan` on this network.

    Type the code NAME shows: if it differs from the one this device computes, someone
    else answered NAME's request and nothing is admitted."""
    home = home_of(ctx)

    def typed(request_name: str) -> str:
        if code is not None:
            return code
        question = f"Type the code shown on {request_name}"
        if sys.stdin.isatty():
            return str(click.prompt(question, err=True))
        click.echo(f"{question}: ", err=True, nl=False)
        line = sys.stdin.readline()     # a script typing it (tests); EOF is no code
        if not line:
            raise UsageError(f"no code typed: type the code {request_name} shows, or give "
                             "it with --code")
        return line.strip()

    admitted = run_prompting(lambda: approve_request(home, name, typed))
    click.echo(f"Admitted {admitted.device_name} (device {admitted.device_id}) for user "
               f"{admitted.user}: it has your keys and can sync now")
