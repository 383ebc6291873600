"""`cairn`, the agent's command line (click). Only the shell exists so far."""

from __future__ import annotations

from typing import Any

import click

from agent.errors import CairnAgentError


class _Group(click.Group):
    """Our errors become one line on stderr and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CairnAgentError as exc:
            click.echo(f"cairn: error: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cairn", prog_name="cairn")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Cairn agent: sync folders with your Cairn appliance, end-to-end encrypted.

    The agent's commands are being built: join (enroll this device with a code from
    `cairnd user add`), put, get, ls, rm, mv, share, unshare, shared, sync, mount and
    status. This version has none of them yet; only --version and --help work.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def main() -> None:
    cli(prog_name="cairn")


if __name__ == "__main__":
    main()
