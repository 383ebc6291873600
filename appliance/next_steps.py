"""What to do once the appliance is up, for `cairnd serve --next-steps` (what `make run`
runs): the exact commands that add a user and join this machine as one of their devices.

Printed once, on stdout after the serving line, each line starting with `cairnd:` like the
serving line, with no colour or cursor movement: read the same in a terminal and in the
journal when a unit passes the flag.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from appliance.config import format_listen
from protocol.mdns import local_urls

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def program_dir(argv0: str) -> str:
    """The prefix that runs this installation's commands, from how cairnd was started
    (ARGV0): "" when it was not started as `cairnd` or `cairnd` on PATH is this one, else
    its folder as typed (`.venv/bin/` for `make run`, whose venv is not on PATH)."""
    if os.path.basename(argv0) != "cairnd":
        return ""
    on_path = shutil.which("cairnd")
    if on_path is not None and os.path.exists(argv0) and os.path.samefile(on_path, argv0):
        return ""
    folder = os.path.dirname(argv0)
    return folder + "/" if folder else ""


def join_url(host: str, port: int) -> str:
    """The address a device on this machine reaches an appliance listening on HOST:PORT
    at (a wildcard address means every interface, loopback included)."""
    return f"https://{format_listen(WILDCARDS.get(host, host), port)}"


def next_steps(home: Path, host: str, port: int, bin_dir: str) -> list[str]:
    """The lines to print for an appliance in HOME listening on HOST:PORT; BIN_DIR
    prefixes the commands (see program_dir). `cairn join` without --url tries this machine's
    default address itself, so --url is shown only when the appliance listens elsewhere."""
    url = join_url(host, port)
    join = f"{shlex.quote(bin_dir + 'cairn')} join CODE"
    if url not in local_urls():
        join += f" --url {url}"
    commands = [
        (f"{shlex.quote(bin_dir + 'cairnd')} user add NAME --home {shlex.quote(str(home))}",
         "prints NAME's one-time code (last line)"),
        (join, "makes this machine a device of NAME"),
    ]
    width = max(len(command) for command, _ in commands)
    relative = not home.is_absolute() or (bin_dir != "" and not bin_dir.startswith("/"))
    where = "in another terminal, in this folder" if relative else "in another terminal"
    return [f"cairnd: next steps, {where}:",
            *(f"cairnd:   {command.ljust(width)}  # {why}" for command, why in commands),
            "cairnd: Ctrl-C (or SIGTERM) stops the appliance."]
