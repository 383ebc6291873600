"""The `cairn` agent's file commands end to end: the CLI (in-process) against the session's
real `cairnd serve` on 127.0.0.1 — put/get round trips (byte for byte; a folder tree with
mtimes to the nanosecond and modes), ls, mkdir, rm and mv; put making missing folders, and
one folder (not two of one name) when two devices make it at once."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest
import trio
from agent_helpers import agent_env, cairn_ok, fails, ls_json, make_user, run_cairn
from cairnd_helpers import Served, database_rows

from agent import operations as ops
from agent.crypto.blocks import BLOCK_SIZE
from agent.crypto.nodes import folder_node_id
from agent.errors import RemoteNotFoundError, UsageError
from agent.home import AgentHome
from agent.remote import RemoteNode, RemoteTree, Target

MiB = 1024 * 1024
PUT_LINE = re.compile(r"^uploaded (\d+) file\(s\), .*: sent (\d+) of (\d+) blocks "
                      r"\((\d+) were on the appliance already\)$")
GET_LINE = re.compile(r"^downloaded (\d+) file\(s\), .*: fetched (\d+) of (\d+) blocks$")


@pytest.fixture(scope="module")
def alice(appliance: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_user(appliance, "alice").join(tmp_path_factory.mktemp("alice") / "home")


def put_summary(output: str) -> tuple[int, int, int, int]:
    """(files, blocks sent, blocks, blocks already there) from put's summary line."""
    match = PUT_LINE.match(output.strip().splitlines()[-1])
    assert match is not None, output
    files, sent, total, present = map(int, match.groups())
    return files, sent, total, present


def get_summary(output: str) -> tuple[int, int, int]:
    """(files, blocks fetched, blocks) from get's summary line."""
    match = GET_LINE.match(output.strip().splitlines()[-1])
    assert match is not None, output
    files, fetched, total = map(int, match.groups())
    return files, fetched, total


def write_random(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        left = size
        while left:
            chunk = min(left, 8 * MiB)
            out.write(os.urandom(chunk))
            left -= chunk
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# --- put and get -------------------------------------------------------------------------

SIZES = {"empty": 0, "one-byte": 1, "4MiB": BLOCK_SIZE, "4MiB+1": BLOCK_SIZE + 1}


def test_file_round_trips_at_block_boundaries(alice: Path, tmp_path: Path) -> None:
    """Each file put on its own, the folder got back in one go; sizes around a block."""
    cairn_ok(alice, "mkdir", "/sizes")
    originals = {}
    for name, size in SIZES.items():
        originals[name] = write_random(tmp_path / name, size)
        blocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        assert put_summary(cairn_ok(alice, "put", originals[name], f"/sizes/{name}")) == \
            (1, blocks, blocks, 0)

    back = tmp_path / "back"
    assert get_summary(cairn_ok(alice, "get", "/sizes", back)) == (4, 4, 4)
    for name, original in originals.items():
        copy = back / name
        assert copy.read_bytes() == original.read_bytes(), name
        assert copy.stat().st_mtime_ns == original.stat().st_mtime_ns, name
    listing = ls_json(alice, "/sizes")
    assert sorted((e["name"], e["kind"], e["size"]) for e in listing) == \
        sorted((name, "file", size) for name, size in SIZES.items())


def test_100_mb_round_trip(alice: Path, tmp_path: Path) -> None:
    original = write_random(tmp_path / "big.bin", 100 * MiB)
    blocks = 25
    assert put_summary(cairn_ok(alice, "put", original, "/big.bin")) == \
        (1, blocks, blocks, 0)
    copy = tmp_path / "big-copy.bin"
    assert get_summary(cairn_ok(alice, "get", "/big.bin", copy)) == (1, blocks, blocks)
    assert copy.stat().st_size == original.stat().st_size
    assert sha256_of(copy) == sha256_of(original)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".cairn-part")]


def make_tree(root: Path) -> dict[str, tuple[int, int]]:
    """A folder tree with nested and empty folders, an executable, an empty file and odd
    mtimes; {relative path of each file: (mtime_ns, mode)}."""
    files = {
        "a.txt": (1_000, 0o644, 1_600_000_000_123_456_789),
        "run.sh": (300, 0o755, 1_500_000_000_000_000_001),
        "sub/b.bin": (200_000, 0o640, 1_700_000_000_999_999_999),
        "sub/deeper/c.txt": (0, 0o644, 1_234_567_890_000_000_007),
        "sub/deeper/secret": (77, 0o600, 1_650_000_000_500_000_000),
    }
    (root / "empty").mkdir(parents=True)
    (root / "sub" / "deeper" / "also-empty").mkdir(parents=True)
    expected = {}
    for relative, (size, mode, mtime_ns) in files.items():
        path = write_random(root / relative, size)
        path.chmod(mode)
        os.utime(path, ns=(mtime_ns, mtime_ns))
        expected[relative] = (mtime_ns, mode)
    return expected


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int, int]]:
    """Every entry under ROOT: kind, content, mtime_ns and permission bits (files only)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            entries[relative] = ("dir", b"", 0, 0)
        else:
            assert stat.S_ISREG(info.st_mode), path
            entries[relative] = ("file", path.read_bytes(), info.st_mtime_ns,
                                 stat.S_IMODE(info.st_mode))
    return entries


def test_folder_tree_round_trip(alice: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    expected = make_tree(tree)
    files, sent, total, _ = put_summary(cairn_ok(alice, "put", tree, "/"))
    assert files == 5 and sent == total == 4   # the empty file has no block

    back = tmp_path / "back"
    assert get_summary(cairn_ok(alice, "get", "/tree", back)) == (5, 4, 4)
    assert snapshot(back) == snapshot(tree)
    assert (back / "empty").is_dir() and not any((back / "empty").iterdir())
    assert os.access(back / "run.sh", os.X_OK)
    for relative, (mtime_ns, mode) in expected.items():
        info = (back / relative).stat()
        assert (info.st_mtime_ns, stat.S_IMODE(info.st_mode)) == (mtime_ns, mode), relative

    listing = ls_json(alice, "/tree")
    assert [(e["name"], e["kind"]) for e in listing] == [
        ("empty", "dir"), ("sub", "dir"), ("a.txt", "file"), ("run.sh", "file")]
    by_name = {e["name"]: e for e in listing}
    assert by_name["a.txt"]["size"] == 1_000 and by_name["run.sh"]["size"] == 300
    assert by_name["a.txt"]["mtime_ns"] == 1_600_000_000_123_456_789
    assert by_name["a.txt"]["mtime"] == pytest.approx(1_600_000_000.123456789)
    assert by_name["run.sh"]["mode"] == 0o755
    assert [e["name"] for e in ls_json(alice, "/tree/sub/deeper")] == \
        ["also-empty", "c.txt", "secret"]

    plain = run_cairn(alice, "ls", "/tree", env=agent_env(TZ="UTC"))
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout.splitlines()
    assert [line.split()[-1] for line in text] == ["empty/", "sub/", "a.txt", "run.sh"]
    assert text[2].split() == ["1000", "B", "2020-09-13", "12:26", "a.txt"]

    again = put_summary(cairn_ok(alice, "put", tree, "/"))
    assert again == (5, 0, 4, 4)   # nothing changed: nothing sent


# --- mkdir, rm, mv -----------------------------------------------------------------------

def test_mkdir_and_rm(alice: Path, tmp_path: Path) -> None:
    fails(run_cairn(alice, "mkdir", "/m/x/y"), RemoteNotFoundError.exit_code, "-p")
    cairn_ok(alice, "mkdir", "-p", "/m/x/y")
    cairn_ok(alice, "mkdir", "-p", "/m/x/y")   # exists already: fine with -p
    fails(run_cairn(alice, "mkdir", "/m/x"), UsageError.exit_code, "already exists")
    assert [(e["name"], e["kind"]) for e in ls_json(alice, "/m/x")] == [("y", "dir")]

    cairn_ok(alice, "put", write_random(tmp_path / "f.bin", 10), "/m/x/y/f.bin")
    fails(run_cairn(alice, "rm", "/m/x"), UsageError.exit_code, "rm -r")
    cairn_ok(alice, "rm", "/m/x/y/f.bin")
    assert ls_json(alice, "/m/x/y") == []
    cairn_ok(alice, "rm", "-r", "/m")
    fails(run_cairn(alice, "ls", "/m/x"), RemoteNotFoundError.exit_code, "/m")


def test_mv_renames_and_moves_without_sending_blocks(appliance: Served, alice: Path,
                                                    tmp_path: Path) -> None:
    config, _ = appliance
    original = write_random(tmp_path / "orig.bin", BLOCK_SIZE + 12_345)
    cairn_ok(alice, "mkdir", "-p", "/mv/dest")
    assert put_summary(cairn_ok(alice, "put", original, "/mv/orig.bin")) == (1, 2, 2, 0)
    [before] = ls_json(alice, "/mv/orig.bin")
    blocks_before = database_rows(config, "SELECT block_id FROM node_blocks WHERE "
                                          "node_id = ? ORDER BY position", before["id"])
    stored_before = database_rows(config, "SELECT count(*) FROM blocks")

    cairn_ok(alice, "mv", "/mv/orig.bin", "/mv/renamed.bin")      # a rename
    cairn_ok(alice, "mv", "/mv/renamed.bin", "/mv/dest")            # into a folder
    assert [e["name"] for e in ls_json(alice, "/mv")] == ["dest"]
    [after] = ls_json(alice, "/mv/dest")
    assert after["name"] == "renamed.bin"
    assert after["id"] == before["id"] and after["version"] == before["version"] + 2
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    # A move re-wraps one key: the block list and the stored blocks are untouched.
    assert database_rows(config, "SELECT block_id FROM node_blocks WHERE node_id = ? "
                                 "ORDER BY position", after["id"]) == blocks_before
    assert database_rows(config, "SELECT count(*) FROM blocks") == stored_before

    copy = tmp_path / "copy.bin"
    assert get_summary(cairn_ok(alice, "get", "/mv/dest/renamed.bin", copy)) == (1, 2, 2)
    assert copy.read_bytes() == original.read_bytes()
    # The same content under another name: every block is on the appliance already.
    assert put_summary(cairn_ok(alice, "put", original, "/mv/again.bin")) == (1, 0, 2, 2)


# --- missing folders ---------------------------------------------------------------------

def test_put_makes_missing_folders(alice: Path, tmp_path: Path) -> None:
    assert "mkdir -p" in cairn_ok(alice, "put", "--help")
    original = write_random(tmp_path / "x.txt", 1000)
    cairn_ok(alice, "put", original, "/np/docs/2026/x.txt")
    assert [(e["name"], e["kind"]) for e in ls_json(alice, "/np/docs")] == [("2026", "dir")]
    cairn_ok(alice, "get", "/np/docs/2026/x.txt", tmp_path / "back.txt")
    assert (tmp_path / "back.txt").read_bytes() == original.read_bytes()

    cairn_ok(alice, "put", original, "/np/into/")            # a folder to put it in
    assert [e["name"] for e in ls_json(alice, "/np/into")] == ["x.txt"]
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    write_random(tmp_path / "tree" / "sub" / "y.bin", 10)
    cairn_ok(alice, "put", tmp_path / "tree", "/np/a/b/copy")   # a folder, renamed
    assert [e["name"] for e in ls_json(alice, "/np/a/b/copy/sub")] == ["y.bin"]

    # A file in the way: one clear line, and nothing made.
    for remote in ("/np/docs/2026/x.txt/y.txt", "/np/docs/2026/x.txt/deeper/y.txt",
                   "/np/docs/2026/x.txt/"):
        fails(run_cairn(alice, "put", original, remote), UsageError.exit_code,
              "/np/docs/2026/x.txt is a file, not a folder")
    assert [e["name"] for e in ls_json(alice, "/np/docs/2026")] == ["x.txt"]


async def test_a_folder_made_on_two_devices_at_once_is_one_folder(appliance: Served,
                                                                  tmp_path: Path) -> None:
    carol = make_user(appliance, "carol")
    laptop, desktop = (carol.join(tmp_path / name, name) for name in ("laptop", "desktop"))
    made: list[RemoteNode] = []
    async with ops.session(AgentHome(laptop)) as one, ops.session(AgentHome(desktop)) as two:
        root = await one.root()

        async def make(tree: RemoteTree) -> None:
            # Each saw no folder "race" (existing None) and creates it now.
            made.append(await ops.make_folder(tree, Target(await tree.root(), "race", None)))

        async def put(tree: RemoteTree, n: int) -> None:
            await ops.put(tree, write_random(tmp_path / f"f{n}.bin", 100), "/race2/deep/")

        async with trio.open_nursery() as nursery:
            for n, tree in enumerate([one, two] * 4):
                nursery.start_soon(make, tree)
                nursery.start_soon(put, tree, n)
    # One id for all, the one derived from the parent and the name (first attempt).
    assert {node.id for node in made} == {
        folder_node_id(one.keys.content_secret, root.id, "race")}
    assert [e["name"] for e in ls_json(laptop) if e["name"].startswith("race")] == \
        ["race", "race2"]
    assert [e["name"] for e in ls_json(desktop, "/race2")] == ["deep"]
    assert sorted(e["name"] for e in ls_json(desktop, "/race2/deep")) == \
        [f"f{n}.bin" for n in range(8)]


def test_a_name_whose_folder_was_renamed_or_deleted_is_made_again(alice: Path,
                                                                   tmp_path: Path) -> None:
    """The first derived id of /held is kept by the renamed folder, the second by the
    deleted one (in the trash): each new /held takes the next."""
    original = write_random(tmp_path / "a.txt", 10)
    cairn_ok(alice, "mkdir", "/held")
    cairn_ok(alice, "mv", "/held", "/moved")
    cairn_ok(alice, "put", original, "/held/a.txt")
    cairn_ok(alice, "rm", "-r", "/held")
    cairn_ok(alice, "put", original, "/held/b.txt")
    entries = [e for e in ls_json(alice) if e["name"] in ("held", "moved")]
    assert sorted(e["name"] for e in entries) == ["held", "moved"]
    assert [e["name"] for e in ls_json(alice, "/held")] == ["b.txt"]
    assert "/held/a.txt" in cairn_ok(alice, "trash", "--all")
    secret, root = AgentHome(alice).load_keys().content_secret, entries[0]["parent"]
    assert {e["name"]: e["id"] for e in entries} == {
        "moved": folder_node_id(secret, root, "held", 0),
        "held": folder_node_id(secret, root, "held", 2)}
