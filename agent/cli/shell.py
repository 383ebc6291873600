"""The `cairn` group and what every command shares: errors as one line and their exit
code, running under trio with clean stops on SIGTERM/SIGINT, sizes and times as text."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
import trio

from agent import operations as ops
from agent.errors import CairnAgentError, TransportError
from agent.home import AgentHome, default_home
from agent.pipeline import first_error
from agent.remote import RemoteTree
from agent.stopping import Interrupted, Stopped, until_signalled

T = TypeVar("T")

# What `cairn status` shows besides the device and its sync folders, added by plugins
# (agent/cli/__init__.py): each gives (its key in --json, its value, its lines).
status_sections: list[Callable[[AgentHome], tuple[str, Any, list[str]]]] = []


class ErrorsAsLines(click.Group):
    """Our errors become one line on stderr and their exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BaseExceptionGroup as group:
            error = first_error(group)
            if isinstance(error, CairnAgentError):
                fail(ctx, error)
            raise
        except CairnAgentError as exc:
            fail(ctx, exc)
        except httpx.HTTPError as exc:
            fail(ctx, TransportError(f"talking to the appliance failed: {exc}"))
        except Interrupted as exc:
            click.echo(f"cairn: {exc.message}", err=True)
            ctx.exit(exc.stopped.exit_code)
        except KeyboardInterrupt:
            click.echo("cairn: interrupted", err=True)
            ctx.exit(130)


def fail(ctx: click.Context, error: CairnAgentError) -> None:
    click.echo(f"cairn: error: {error.message}", err=True)
    ctx.exit(error.exit_code)


def run_prompting(function: Callable[[], Awaitable[T]]) -> T:
    """FUNCTION() under trio, for join and unlock: Ctrl-C stays a KeyboardInterrupt, which
    also ends a passphrase prompt (a signal handled by trio would not)."""
    return trio.run(function)


def run_stoppable(function: Callable[[], Awaitable[T]], *, resumable: bool) -> T:
    """FUNCTION() under trio. SIGTERM or SIGINT stops it cleanly and raises Interrupted
    (RESUMABLE: the message says that running it again resumes)."""
    outcome = trio.run(until_signalled, function)
    if isinstance(outcome, Stopped):
        raise interrupted(outcome, resumable)
    return outcome


def interrupted(stopped: Stopped, resumable: bool) -> Interrupted:
    again = "; run the same command again to resume" if resumable else ""
    return Interrupted(stopped, f"interrupted by {stopped.name}{again}")


def home_of(ctx: click.Context) -> AgentHome:
    return AgentHome(ctx.obj["home"])


def in_session(ctx: click.Context, work: Callable[[RemoteTree], Awaitable[T]], *,
                resumable: bool = False) -> T:
    home = home_of(ctx)

    async def run() -> T:
        async with ops.session(home) as tree:
            return await work(tree)

    return run_stoppable(run, resumable=resumable)


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def when_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


@click.group(cls=ErrorsAsLines, invoke_without_command=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(path_type=Path), default=None,
              help="The agent's home (device credentials and keys). Default: $CAIRN_HOME, "
                   "else ~/.cairn.")
@click.version_option(package_name="cairn", prog_name="cairn")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Cairn agent: your files on your Cairn appliance, end-to-end encrypted.

    Start with `cairn join CODE` (the code comes from `cairnd user add NAME` or
    `cairnd user code NAME` on the appliance). Then put, get, ls, mkdir, rm, mv files;
    share them with other users; `cairn trash` and `cairn restore` bring back what was
    deleted on any device; `cairn status` shows where this device stands.

    REMOTE arguments are paths from your root folder (/docs/a.txt) or id:<node id>, which
    is how you name something another user shared with you (see `cairn shared`).
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home if home is not None else default_home()
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
