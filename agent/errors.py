"""Every error the agent raises on purpose, in one tree.

    CairnAgentError                base; carries an exit code for the command line

Nothing raises anything more specific yet: subclasses (enrollment, connection, conflict,
crypto errors) arrive with the commands that raise them. The command line prints `message`
on one line and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations


class CairnAgentError(Exception):
    """Base class. `code` is a stable machine-readable name; `exit_code` is the CLI's."""

    code = "internal"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
