"""Progress of a transfer: a bar with rate and ETA on a terminal (tqdm, on stderr), nothing
when stderr is not a terminal (scripts, logs, tests), so output stays quiet there."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm


class Progress:
    def __init__(self, total_bytes: int, label: str, *, stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        stream = stream or sys.stderr
        if enabled is None:
            enabled = stream.isatty()
        self._bar: tqdm[Any] | None = tqdm(
            total=total_bytes, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
            file=stream, leave=False, dynamic_ncols=True, miniters=1,
            mininterval=0.2) if enabled else None

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
