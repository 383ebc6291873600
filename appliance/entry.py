"""The `cairnd` command's entry point: a clear line, not a traceback, when this machine has
only the agent's packages (`pip install 'cairn[agent]'`) and someone runs the appliance."""

from __future__ import annotations

import sys

APPLIANCE_PACKAGES = ("fastapi", "hypercorn", "pyeclib")


def main() -> None:
    try:
        from appliance.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in APPLIANCE_PACKAGES:
            raise
        sys.stderr.write(f"cairnd: error: the appliance's packages are not installed "
                         f"({exc.name} is missing); install them with "
                         f"pip install 'cairn[appliance]'\n")
        sys.exit(1)
    cli_main()
