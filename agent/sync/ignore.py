"""What `cairn sync` leaves alone: DIR/.cairnignore plus built-in patterns.

DIR/.cairnignore uses gitignore syntax (through `pathspec`), matched against '/'-separated
paths relative to DIR. On top of it, always:

- Cairn's own files: names starting with `.cairn-` (reserved for the agent) and
  `*.cairn-part` (a download in progress, `.NAME.<id>-v<version>.cairn-part`), files or
  folders alike;
- editor, office and OS temporaries (`BUILTIN_TEMPORARY_FILES`), for files only: these
  programs only ever create them as files, while a folder called `4913` or `old~` is
  someone's data.

As in git, nothing under an ignored folder can be brought back by a later `!pattern`, and
`ignores` checks every parent, so a deep path is judged right on its own (an inotify event
for `build/x/y.o` when `build/` is ignored). DIR/.cairnignore itself is never ignored: it
syncs like any file, so every device follows the same rules.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pathspec

log = logging.getLogger(__name__)

IGNORE_FILE: Final = ".cairnignore"

BUILTIN_RESERVED: Final = (".cairn-*", "*.cairn-part")

BUILTIN_TEMPORARY_FILES: Final = (
    "*.swp", "*.swx", "*.swo", "4913",      # vim: swap files and its write-permission probe
    "*~", ".#*", "#*#",                     # backups, emacs locks and autosaves
    ".~lock.*#", "~$*",                     # LibreOffice and Microsoft Office lock files
    ".DS_Store", "Thumbs.db",               # OS folder metadata
    "*.tmp", ".goutputstream-*",            # generic, GLib's atomic-save temporaries
    "*.part", "*.crdownload",               # browser downloads in progress
)


def _name_matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


_RESERVED_NAME: Final = _name_matcher(BUILTIN_RESERVED)
_TEMPORARY_FILE_NAME: Final = _name_matcher(BUILTIN_TEMPORARY_FILES)


FOLDERS_REMEMBERED = 65_536


@functools.lru_cache(maxsize=8)
def _rules_from_text(text: str) -> IgnoreRules:
    return IgnoreRules._compile(text)


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    """The engine reloads the rules every round: say each problem once, not every time."""
    log.warning("%s", message)


@dataclass(frozen=True)
class IgnoreRules:
    """The rules for one DIR. `rejected_lines` are .cairnignore lines that are not valid
    patterns (e.g. a lone `!`); they are skipped, the rest apply."""

    user_patterns: pathspec.GitIgnoreSpec
    rejected_lines: tuple[str, ...] = ()
    # folder -> whether it or a folder above it is ignored: every watcher event and every
    # file a scan meets asks about its folders. Bounded; the rules never change.
    _folders: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_text(cls, text: str) -> IgnoreRules:
        """Rules from the text of a .cairnignore file (pure). The same text gives the same
        (immutable) rules: the engine loads them every round."""
        return _rules_from_text(text)

    @classmethod
    def _compile(cls, text: str) -> IgnoreRules:
        accepted: list[str] = []
        rejected: list[str] = []
        for line in text.splitlines():
            try:
                pathspec.GitIgnoreSpec.from_lines([line])
            except (ValueError, re.error):
                rejected.append(line)
            else:
                accepted.append(line)
        return cls(pathspec.GitIgnoreSpec.from_lines(accepted), tuple(rejected))

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        """The rules in ROOT/.cairnignore. A missing file means the built-ins only; one that
        cannot be read or decoded also does, with a warning: sync goes on either way."""
        path = root / IGNORE_FILE
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            return cls.from_text("")
        except OSError as exc:
            _warn_once(f"cannot read {path} ({exc.strerror}): only built-in ignore rules apply")
            return cls.from_text("")
        except UnicodeDecodeError:
            _warn_once(f"{path} is not UTF-8 text: only built-in ignore rules apply")
            return cls.from_text("")
        rules = cls.from_text(text)
        if rules.rejected_lines:
            shown = ", ".join(repr(line) for line in rules.rejected_lines)
            _warn_once(f"{path}: skipping invalid patterns {shown}")
        return rules

    def ignores(self, relative_path: str, is_dir: bool) -> bool:
        """Whether sync leaves RELATIVE_PATH ('/'-separated, relative to DIR, no leading
        slash) alone, because of its own name or because a parent folder is ignored."""
        parent, _, name = relative_path.rpartition("/")
        if parent and self._folder_ignored(parent):
            return True
        return self._ignores_itself(relative_path, name, is_dir)

    def _folder_ignored(self, folder: str) -> bool:
        ignored = self._folders.get(folder)
        if ignored is None:
            parent, _, name = folder.rpartition("/")
            ignored = (bool(parent) and self._folder_ignored(parent)) \
                or self._ignores_itself(folder, name, True)
            if len(self._folders) >= FOLDERS_REMEMBERED:
                self._folders.clear()
            self._folders[folder] = ignored
        return ignored

    def _ignores_itself(self, path: str, name: str, is_dir: bool) -> bool:
        if not path or path == IGNORE_FILE:
            return False
        if _RESERVED_NAME.match(name):
            return True
        if not is_dir and _TEMPORARY_FILE_NAME.match(name):
            return True
        # pathspec matches folder-only patterns (`build/`) against a trailing slash.
        return self.user_patterns.match_file(f"{path}/" if is_dir else path)
