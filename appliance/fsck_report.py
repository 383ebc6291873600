"""What `cairnd fsck` finds: the kinds of problem (errors and notices), the pure rules that
decide them, and the report a run returns (appliance/fsck.py makes the runs).

A kind is an *error* when the database and the store disagree in a way the system does not
resolve by itself (a lost block, a wrong count, a node `uploaded` with a block missing);
a *notice* when it is the normal trace of a crash or a failed disk that upkeep resolves
(a degraded block queued for repair, a block stored but not yet recorded, an orphan waiting
out its grace period). A report is clean when no error remains after the run.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_LISTED = 100         # findings listed per kind (all are counted)
CHECKED_LABELS = (("nodes", "live nodes"), ("blocks", "block rows"),
                  ("referenced_blocks", "referenced blocks"),
                  ("store_blocks", "blocks in the store"))


class Severity(enum.StrEnum):
    ERROR = "error"
    NOTICE = "notice"


@dataclass(frozen=True)
class Kind:
    name: str
    severity: Severity
    check: str
    means: str
    repair: str


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("dangling_node_blocks", Severity.ERROR, "dangling",
         "block lists of nodes that no longer exist", "deleted"),
    Kind("stray_pending", Severity.ERROR, "dangling",
         "pending-block rows of deleted or missing nodes", "deleted"),
    Kind("dangling_grants", Severity.ERROR, "dangling",
         "grants on nodes that no longer exist", "deleted"),
    Kind("detached_node", Severity.ERROR, "dangling",
         "live nodes whose folder is deleted or missing (invisible in the tree)",
         "none: left for a person to decide"),
    Kind("block_row_missing", Severity.ERROR, "refs",
         "blocks that nodes reference with no row in `blocks`",
         "row added as not stored (its nodes then wait for a device to send it)"),
    Kind("wrong_refs", Severity.ERROR, "refs",
         "blocks whose reference count is not the positions live nodes give them",
         "count corrected"),
    Kind("unreferenced_mark", Severity.ERROR, "refs",
         "blocks whose unreferenced_since disagrees with their count (never collected)",
         "corrected"),
    Kind("missing_block", Severity.ERROR, "store",
         "blocks recorded as stored with no shard on any readable disk",
         "marked not stored: their nodes go back to `uploading` until a device sends "
         "the block again"),
    Kind("unrecoverable_block", Severity.ERROR, "store",
         "blocks recorded as stored with too few healthy shards to decode",
         "marked not stored: their nodes go back to `uploading` until a device sends "
         "the block again"),
    Kind("degraded_block", Severity.NOTICE, "store",
         "blocks with shards missing, still decodable", "queued for repair"),
    Kind("unrecorded_block", Severity.NOTICE, "store",
         "blocks live nodes need that the store holds but the database does not record "
         "as stored (a crash between the store's write and the commit)",
         "recorded as stored once a full read checks them"),
    Kind("uploaded_missing_blocks", Severity.ERROR, "nodes",
         "nodes `uploaded` while one of their blocks is not stored",
         "back to `uploading`, a pending row per block lacking (the owner's device is "
         "asked for it again)"),
    Kind("pending_mismatch", Severity.ERROR, "nodes",
         "nodes whose pending rows are not the blocks they lack",
         "pending rows rewritten; a node lacking nothing becomes `uploaded`"),
    Kind("orphan_block", Severity.NOTICE, "orphans",
         "blocks in the store unknown to the database",
         "deleted once first seen longer ago than the grace period"),
    Kind("deleted_leftover", Severity.NOTICE, "orphans",
         "shards of deleted (tombstoned) blocks still on a disk",
         "none here: scrub removes them"),
)}


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str                     # a block id, a node id, or "user N / node ID"
    detail: str = ""
    nodes: tuple[str, ...] = ()      # nodes that need a lost block
    repaired: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail,
                "nodes": list(self.nodes), "repaired": self.repaired}


@dataclass(frozen=True)
class FsckProgress:
    phase: str
    done: int
    elapsed: float

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "done": self.done, "elapsed": round(self.elapsed, 1)}


@dataclass
class FsckReport:
    repair: bool = False
    verify: bool = False
    checks: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)  # what was looked at, by name
    found: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _listed: Counter[str] = field(default_factory=Counter, repr=False)

    def add(self, finding: Finding) -> None:
        self.found[finding.kind] += 1
        if finding.repaired:
            self.repaired[finding.kind] += 1
        if self._listed[finding.kind] < MAX_LISTED:
            self._listed[finding.kind] += 1
            self.findings.append(finding)

    def remaining(self, kind: str) -> int:
        return self.found[kind] - self.repaired[kind]

    @property
    def errors_remaining(self) -> int:
        return sum(self.remaining(name) for name, kind in KINDS.items()
                   if kind.severity is Severity.ERROR)

    @property
    def clean(self) -> bool:
        """No error is left (notices do not count: see the module doc)."""
        return self.errors_remaining == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean, "errors_remaining": self.errors_remaining,
            "repair": self.repair, "verify": self.verify, "checks": self.checks,
            "checked": dict(self.checked), "seconds": round(self.seconds, 3),
            "problems": {name: {"severity": kind.severity.value, "check": kind.check,
                                "found": self.found[name], "repaired": self.repaired[name]}
                         for name, kind in KINDS.items() if kind.check in self.checks},
            "findings": [finding.to_json() for finding in self.findings],
            "notes": self.notes,
        }

    def summary(self) -> str:
        """A few lines for people: what was checked, then each kind found, a few of each."""
        looked = ", ".join(f"{self.checked[name]} {label}" for name, label in CHECKED_LABELS
                           if name in self.checked)
        verdict = "clean" if self.clean else f"{self.errors_remaining} problems remain"
        lines = [f"checked {looked or 'nothing'} in {self.seconds:.1f} s: {verdict}"]
        for name, kind in KINDS.items():
            if not self.found[name]:
                continue
            lines.append(f"  {kind.severity.value:<6} {name}: {self.found[name]} {kind.means}")
            if self.repaired[name]:
                lines.append(f"         repaired {self.repaired[name]}: {kind.repair}")
            for finding in [f for f in self.findings if f.kind == name][:5]:
                needed = f"; needed by {', '.join(finding.nodes)}" if finding.nodes else ""
                lines.append(f"         {finding.subject} {finding.detail}{needed}".rstrip())
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# --- the pure parts: what a row or a node should be ---------------------------------------

def refs_verdict(refs: int, unreferenced_since: float | None, live: int) -> list[str]:
    """The problem kinds of a `blocks` row whose block live nodes use LIVE times."""
    kinds = []
    if refs != live:
        kinds.append("wrong_refs")
    if (live > 0) != (unreferenced_since is None):
        kinds.append("unreferenced_mark")
    return kinds


def node_verdict(status: str, lacking: set[str], pending: set[str]) -> str | None:
    """The problem kind of a live node (None when consistent): it is `uploading` exactly
    when it lacks a block, with one pending row per block it lacks."""
    if status == "uploaded" and lacking:
        return "uploaded_missing_blocks"
    if (status == "uploading") != bool(lacking) or lacking != pending:
        return "pending_mismatch"
    return None


def store_verdict(decodable: bool, holders: int, total: int) -> str | None:
    if not decodable:
        return "missing_block" if holders == 0 else "unrecoverable_block"
    return "degraded_block" if holders < total else None
