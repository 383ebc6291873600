"""`cairnd user ...` and `cairnd device ...`: accounts and enrollment codes. They work
whether or not the appliance is serving (the database is shared safely through WAL)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import apsw
import click

from appliance.config import load_config
from appliance.meta import accounts
from appliance.meta.database import Metadata
from appliance.tls import read_certificate_fingerprint

T = TypeVar("T")


def _write(home: Path, fn: Callable[[apsw.Connection], T]) -> T:
    meta = Metadata(load_config(home).database)
    try:
        return meta.write_sync(fn)
    finally:
        meta.close()


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def _print_code(home: Path, user: str, code: str, expires_at: float) -> None:
    config = load_config(home)
    fingerprint = read_certificate_fingerprint(config.tls_certificate)
    click.echo(f"Enrollment code for a new device of {user}, valid once until "
               f"{_when(expires_at)} (appliance {config.appliance_id}, certificate sha256 "
               f"{fingerprint[:16]}…). On the device run: cairn join CODE")
    click.echo(code)


def register(cli: click.Group, home_option: Callable[[Callable[..., None]],
                                                     Callable[..., None]]) -> None:
    @cli.group()
    def user() -> None:
        """Users: add one (prints an enrollment code), list them, or make a code for
        another device of an existing user."""

    @user.command("add")
    @click.argument("name")
    @home_option
    def user_add(name: str, home: Path) -> None:
        """Create user NAME and print a one-time enrollment code for their first device
        as the last line of stdout.

        \b
        Example:
          cairnd user add alice --home /var/lib/cairn
        """
        lifetime = load_config(home).enrollment_code_lifetime_s

        def add(db: apsw.Connection) -> tuple[str, float]:
            created = accounts.add_user(db, name)
            code, expires = accounts.issue_code(db, created, lifetime)
            return code.format(), expires

        code, expires = _write(home, add)
        click.echo(f"cairnd: created user {name}")
        _print_code(home, name, code, expires)

    @user.command("code")
    @click.argument("name")
    @home_option
    def user_code(name: str, home: Path) -> None:
        """Print a fresh one-time enrollment code for another device of user NAME."""
        lifetime = load_config(home).enrollment_code_lifetime_s

        def issue(db: apsw.Connection) -> tuple[str, float]:
            code, expires = accounts.issue_code(db, accounts.user_by_name(db, name), lifetime)
            return code.format(), expires

        code, expires = _write(home, issue)
        _print_code(home, name, code, expires)

    @user.command("list")
    @home_option
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def user_list(home: Path, as_json: bool) -> None:
        """Every user with their number of active devices."""
        rows = _write(home, accounts.list_users)
        if as_json:
            click.echo(json.dumps([{"name": u.name, "devices": n,
                                    "has_keys": u.public_key is not None,
                                    "created_at": u.created_at} for u, n in rows], indent=2))
            return
        click.echo(f"{'NAME':<20} {'DEVICES':>7}  CREATED")
        for u, n in rows:
            click.echo(f"{u.name:<20} {n:>7}  {_when(u.created_at)}")

    @cli.group()
    def device() -> None:
        """Devices: list them, or revoke one (its token and URLs stop working at once)."""

    @device.command("list")
    @home_option
    @click.option("--user", "user_name", default=None, help="Only this user's devices.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def device_list(home: Path, user_name: str | None, as_json: bool) -> None:
        """Every device: id, user, name, last seen, revoked."""
        devices = _write(home, lambda db: accounts.list_devices(db, user_name))
        if as_json:
            click.echo(json.dumps([{"id": d.id, "user": d.user_name, "name": d.name,
                                    "created_at": d.created_at, "last_seen": d.last_seen,
                                    "revoked": d.revoked_at is not None}
                                   for d in devices], indent=2))
            return
        click.echo(f"{'ID':<20} {'USER':<16} {'NAME':<24} {'LAST SEEN':<16} STATE")
        for d in devices:
            state = "revoked" if d.revoked_at is not None else "active"
            click.echo(f"{d.id:<20} {d.user_name:<16} {d.name:<24} "
                       f"{_when(d.last_seen):<16} {state}")

    @device.command("revoke")
    @click.argument("device_id")
    @home_option
    def device_revoke(device_id: str, home: Path) -> None:
        """Revoke DEVICE_ID (see `cairnd device list`): its token is refused from now on."""
        revoked = _write(home, lambda db: accounts.revoke_device(db, device_id))
        click.echo(f"cairnd: revoked device {revoked.id} ({revoked.name}) of "
                   f"{revoked.user_name}")
