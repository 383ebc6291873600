"""The `cairnd` command's entry point: one clear line, not a traceback, when this machine has
only the agent's packages (`pip install 'cairn[agent]'`) and someone runs the appliance."""

from __future__ import annotations

import importlib.util
import sys

APPLIANCE_PACKAGES = ("fastapi", "hypercorn", "pyeclib")


def main() -> None:
    missing = [name for name in APPLIANCE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        sys.stderr.write(f"cairnd: error: the appliance's packages are not installed "
                         f"({', '.join(missing)}); install them with "
                         f"pip install 'cairn[appliance]'\n")
        sys.exit(1)
    from appliance.cli import main as cli_main

    cli_main()
