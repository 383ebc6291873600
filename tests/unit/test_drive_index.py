"""The drive's index (fuse/index.py) on a real apsw file: the mirror with the pending
changes laid over it, names shown like the sync engine shows them, and the pure pieces
(layout, sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.sync.state import RemoteRow
from fuse.index import DriveIndex, Entry, Pending, layout
from fuse.mount import parse_size

ROOT = "0" * 32
DOCS = "d" * 32
FILE = "f" * 32
NEW = "a" * 32


def row(node_id: str, parent: str | None, name: str, kind: str = "file",
        created: float = 1.0, device: str = "laptop") -> RemoteRow:
    return RemoteRow(node_id=node_id, parent_id=parent, name=name, kind=kind,  # type: ignore[arg-type]
                     version=3, uploaded=True, size=5, mtime_ns=7, mode=0o644, content="c",
                     device=device, created_at=created, updated_at=2.0, key=b"k" * 32,
                     meta=b"m")


def pending(node_id: str, parent: str, name: str, **fields: object) -> Pending:
    values: dict[str, object] = dict(
        node_id=node_id, parent_id=parent, name=name, kind="file", size=9, mtime_ns=8,
        mode=0o600, base_version=None, staged=True, deleted=False, key=b"n" * 32,
        created_at=5.0, changed_at=5.0, generation=0, seq=0, state="dirty", detail="")
    values.update(fields)
    return Pending(**values)  # type: ignore[arg-type]


@pytest.fixture
def index(tmp_path: Path) -> DriveIndex:
    index = DriveIndex(tmp_path / "drive.db", "laptop")
    record = index.start(ROOT)
    for item in (row(ROOT, None, "", "dir"), row(DOCS, ROOT, "docs", "dir"),
                 row(FILE, DOCS, "a.txt")):
        index.sync_db.put_remote(record.id, item)
    return index


def test_the_mirror_shows_through(index: DriveIndex) -> None:
    assert set(index.children(ROOT)) == {"docs"}
    found = index.lookup(DOCS, "a.txt")
    assert found is not None and found.node_id == FILE and not found.local
    assert found.version == 3 and found.size == 5
    assert index.lookup(DOCS, "missing") is None
    assert index.has_children(DOCS) and not index.has_children(FILE)


def test_pending_changes_lay_over_the_mirror(index: DriveIndex) -> None:
    index.put_pending(pending(NEW, DOCS, "new.txt"))
    index.put_pending(pending(FILE, ROOT, "moved.txt", base_version=3, staged=False,
                              size=5))
    assert set(index.children(DOCS)) == {"new.txt"}           # a.txt moved out, new.txt in
    assert set(index.children(ROOT)) == {"docs", "moved.txt"}
    moved = index.entry(FILE)
    assert moved is not None and moved.local and moved.name == "moved.txt"
    assert moved.version == 3
    index.put_pending(pending(FILE, ROOT, "moved.txt", base_version=3, deleted=True))
    assert index.entry(FILE) is None                            # deleted here
    assert set(index.children(ROOT)) == {"docs"}
    assert index.drop_pending(FILE)
    assert index.entry(FILE) is not None                        # back as the mirror has it


def test_generations_and_order(index: DriveIndex) -> None:
    first = index.put_pending(pending(NEW, DOCS, "new.txt"))
    second = index.put_pending(pending(FILE, DOCS, "a.txt", base_version=3))
    again = index.put_pending(pending(NEW, DOCS, "new.txt", size=10))
    assert (first.generation, again.generation) == (1, 2)
    assert first.seq < second.seq < again.seq
    assert not index.drop_pending(NEW, generation=1)            # changed again meanwhile
    assert [p.node_id for p in index.all_pending()] == [FILE, NEW]
    assert index.drop_pending(NEW, generation=2)


def entry(node_id: str, name: str, created: float, device: str = "x") -> Entry:
    return Entry(node_id, ROOT, name, "file", 1, 1, 0o644, 1, True, device, created, None,
                 False, False, "", False)


def test_layout_names_duplicates_like_the_sync_engine() -> None:
    shown = layout([entry("b" * 32, "a.txt", 2.0, "desktop"), entry("c" * 32, "a.txt", 1.0),
                    entry("e" * 32, "b.txt", 1.0)])
    assert shown["a.txt"].node_id == "c" * 32                   # the oldest keeps the name
    copies = [name for name in shown if "conflicted copy from desktop" in name]
    assert len(copies) == 1 and copies[0].endswith(".txt")
    assert shown[copies[0]].node_id == "b" * 32


def test_lookup_finds_a_conflicted_copy_name(index: DriveIndex) -> None:
    record = index.folder()
    assert record is not None
    index.sync_db.put_remote(record.id, row("b" * 32, DOCS, "a.txt", created=9.0,
                                            device="desktop"))
    names = set(index.children(DOCS))
    copy = next(name for name in names if name != "a.txt")
    found = index.lookup(DOCS, copy)
    assert found is not None and found.node_id == "b" * 32
    oldest = index.lookup(DOCS, "a.txt")
    assert oldest is not None and oldest.node_id == FILE


@pytest.mark.parametrize(("text", "size"), [("4G", 4 << 30), ("512M", 512 << 20),
                                            ("8MiB", 8 << 20), ("1.5g", 3 << 29),
                                            ("16777216", 16 << 20)])
def test_cache_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "1M", "", "-5G"])
def test_cache_sizes_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)
