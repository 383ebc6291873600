"""Names of conflicted copies (pure).

`report (conflicted copy from laptop 2026-11-24 101502).docx`: the device that wrote the
version being set aside, and when. The extension stays last so the copy opens with the
same program; names stay within the 255-byte limit.
"""

from __future__ import annotations

import time

from agent.crypto.nodes import MAX_NAME_BYTES

MARKER = "conflicted copy from"


def _split(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    if dot <= 0 or dot == len(name) - 1:
        return name, ""
    return name[:dot], name[dot:]


def _fits(text: str) -> bool:
    return len(text.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES


def copy_name(name: str, device: str, when: float, number: int = 1) -> str:
    stem, ext = _split(name)
    who = " ".join((device or "another device").replace("/", "-").split())[:40]
    stamp = time.strftime("%Y-%m-%d %H%M%S", time.localtime(when))
    tag = f" ({MARKER} {who} {stamp}{'' if number == 1 else f' {number}'})"
    while stem and not _fits(stem + tag + ext):
        stem = stem[:-1]
    return stem + tag + ext


def unique_copy_name(name: str, device: str, when: float, taken: set[str]) -> str:
    """A copy name not in TAKEN."""
    number = 1
    while True:
        candidate = copy_name(name, device, when, number)
        if candidate not in taken:
            return candidate
        number += 1


def is_conflicted_copy(name: str) -> bool:
    return f"({MARKER} " in name
