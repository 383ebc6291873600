"""`cairn`, the agent's command line (click).

shell.py holds the group and what every command shares; device.py joining, unlocking and
`cairn status`; pairing.py admitting a device from the LAN (approve, devices); files.py the
file, trash and sharing commands; sync.py `cairn sync`.

Every command is a thin shell: parse arguments, run the operation under trio, print the
result. Errors the agent raises on purpose (agent.errors) become one line on stderr and
their exit code, never a traceback. Progress bars appear only when stderr is a terminal.
SIGTERM and SIGINT stop a command cleanly (agent.stopping): `cairn sync` then exits 0,
any other command 128 + the signal's number, what it did so far kept (join and unlock,
which may prompt, keep Python's Ctrl-C: exit 130).
"""


from __future__ import annotations

from importlib.metadata import entry_points

from agent.cli import device, files, pairing, sync
from agent.cli.shell import cli, status_sections

__all__ = ["cli", "device", "files", "main", "pairing", "sync"]

# Commands other packages add (the FUSE drive: `cairn mount` and its friends), without the
# agent importing them: each entry point is `register(cli, status_sections)`.
for _plugin in entry_points(group="cairn.commands"):
    _plugin.load()(cli, status_sections)


def main() -> None:
    cli(prog_name="cairn")
