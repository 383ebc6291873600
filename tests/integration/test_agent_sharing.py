"""Sharing between users with the `cairn` CLI (in-process) against the session's real
`cairnd serve` (each user named by role plus a number, `users.name[role]`): what bob
sees of alice's folder, what carol (not invited) and bob (read-only) cannot do, unshare,
and public keys pinned on first use on both sides of a grant."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import cairn_ok, fails, ls_json, make_user, run_cairn
from cairnd_helpers import Served, appliance_database

from agent.errors import ForbiddenError, KeyPinError, RemoteNotFoundError
from appliance.config import ApplianceConfig

SHARED_LINE = re.compile(r"^shared (?P<name>.+) \(id:(?P<id>[0-9a-f]{32})\) with (?P<who>.+)$")


@dataclass(frozen=True)
class Users:
    alice: Path
    bob: Path
    carol: Path
    name: dict[str, str]     # role ("alice") -> the user's name on the appliance


@dataclass(frozen=True)
class SharedFolder:
    folder_id: str
    file_id: str       # data.bin inside it
    local: Path        # what alice uploaded


@pytest.fixture(scope="module")
def users(appliance: Served, tmp_path_factory: pytest.TempPathFactory) -> Users:
    made = {role: make_user(appliance, role) for role in ("alice", "bob", "carol")}
    homes = {role: user.join(tmp_path_factory.mktemp(role) / "home")
             for role, user in made.items()}
    return Users(**homes, name={role: user.name for role, user in made.items()})


def shared_json(home: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(cairn_ok(home, "shared", "--json"))
    return entries


def share(owner: Path, remote: str, *users: str) -> str:
    """`cairn share REMOTE USERS...`; the shared node's id from its answer."""
    match = SHARED_LINE.match(cairn_ok(owner, "share", remote, *users).strip())
    assert match is not None
    assert match["who"] == ", ".join(users)
    return match["id"]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def public_key_replaced(config: ApplianceConfig, user: str) -> Iterator[None]:
    """The appliance's stored public key of USER swapped for another (as a compromised
    appliance could), on the running server's database; put back afterwards."""
    with appliance_database(config, write=True) as db:
        [(original,)] = db.execute("SELECT public_key FROM users WHERE name = ?", (user,))
        db.execute("UPDATE users SET public_key = ? WHERE name = ?", (os.urandom(32), user))
        try:
            yield
        finally:
            db.execute("UPDATE users SET public_key = ? WHERE name = ?", (original, user))


@pytest.fixture(scope="module")
def proj(users: Users, tmp_path_factory: pytest.TempPathFactory) -> SharedFolder:
    """alice's folder /proj (files, a subfolder), shared with bob."""
    local = tmp_path_factory.mktemp("alice-files") / "proj"
    (local / "sub").mkdir(parents=True)
    (local / "readme.txt").write_text("hello bob\n")
    (local / "data.bin").write_bytes(os.urandom(300_000))
    (local / "sub" / "deep.txt").write_bytes(os.urandom(5_000))
    cairn_ok(users.alice, "put", local, "/")
    folder_id = share(users.alice, "/proj", users.name["bob"])
    [data] = ls_json(users.alice, "/proj/data.bin")
    assert [e["id"] for e in ls_json(users.alice, "/") if e["name"] == "proj"] == [folder_id]
    return SharedFolder(folder_id, data["id"], local)


def test_recipient_lists_and_downloads_a_shared_folder(users: Users, proj: SharedFolder,
                                                       tmp_path: Path) -> None:
    [entry] = shared_json(users.bob)
    assert (entry["id"], entry["name"], entry["owner"], entry["kind"]) == \
        (proj.folder_id, "proj", users.name["alice"], "dir")

    cairn_ok(users.bob, "get", f"id:{proj.folder_id}", tmp_path / "got")
    assert files_under(tmp_path / "got") == files_under(proj.local)
    assert len(files_under(proj.local)) == 3

    cairn_ok(users.bob, "get", f"id:{proj.file_id}", tmp_path / "data.bin")
    assert (tmp_path / "data.bin").read_bytes() == (proj.local / "data.bin").read_bytes()
    assert [e["name"] for e in ls_json(users.bob, f"id:{proj.folder_id}")] == \
        ["sub", "data.bin", "readme.txt"]


def test_a_user_it_was_not_shared_with_cannot_get_it(users: Users, proj: SharedFolder,
                                                     tmp_path: Path) -> None:
    for node_id in (proj.folder_id, proj.file_id):
        fails(run_cairn(users.carol, "get", f"id:{node_id}", tmp_path / "x"),
              RemoteNotFoundError.exit_code, f"id:{node_id}", "not shared with you")
    assert proj.folder_id not in [e["id"] for e in shared_json(users.carol)]
    assert not (tmp_path / "x").exists()


def test_a_recipient_cannot_change_what_was_shared(users: Users, proj: SharedFolder,
                                                  tmp_path: Path) -> None:
    fails(run_cairn(users.bob, "rm", f"id:{proj.file_id}"), ForbiddenError.exit_code,
          "read-only")
    fails(run_cairn(users.bob, "mv", f"id:{proj.file_id}", "/"),
          ForbiddenError.exit_code, "read-only")
    (tmp_path / "intruder.txt").write_text("from bob")
    fails(run_cairn(users.bob, "put", tmp_path / "intruder.txt", f"id:{proj.folder_id}"),
          ForbiddenError.exit_code, "read-only")
    fails(run_cairn(users.bob, "share", f"id:{proj.folder_id}", users.name["carol"]),
          ForbiddenError.exit_code, f"belongs to {users.name['alice']}")
    assert [e["name"] for e in ls_json(users.alice, "/proj")] == \
        ["sub", "data.bin", "readme.txt"]


def test_after_unshare_the_recipient_cannot_get_it(users: Users, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_bytes(os.urandom(100_000))
    cairn_ok(users.alice, "put", note, "/brief.txt")
    bob = users.name["bob"]
    node_id = share(users.alice, "/brief.txt", bob)
    cairn_ok(users.bob, "get", f"id:{node_id}", tmp_path / "first")
    assert (tmp_path / "first").read_bytes() == note.read_bytes()

    assert cairn_ok(users.alice, "unshare", "/brief.txt", bob).strip() == \
        f"brief.txt is no longer shared with {bob}"
    fails(run_cairn(users.bob, "get", f"id:{node_id}", tmp_path / "second"),
          RemoteNotFoundError.exit_code, "not shared with you")
    assert not (tmp_path / "second").exists()
    assert node_id not in [e["id"] for e in shared_json(users.bob)]
    fails(run_cairn(users.alice, "unshare", "/brief.txt", bob),
          RemoteNotFoundError.exit_code, f"not shared with {bob}")


def test_sharing_refuses_a_recipient_key_that_changed(appliance: Served, users: Users,
                                                      tmp_path: Path) -> None:
    cairn_ok(users.alice, "mkdir", "-p", "/for-carol/first")
    cairn_ok(users.alice, "mkdir", "-p", "/for-carol/second")
    carol = users.name["carol"]
    first = share(users.alice, "/for-carol/first", carol)   # pins carol's key
    with public_key_replaced(appliance.config, carol):
        message = fails(run_cairn(users.alice, "share", "/for-carol/second", carol),
                        KeyPinError.exit_code, f"public key of user '{carol}' changed")
        assert "refusing" in message
    assert [e["id"] for e in shared_json(users.carol)
            if e["owner"] == users.name["alice"] and e["name"] in ("first", "second")] == \
        [first]


def test_opening_a_grant_refuses_an_owner_key_that_changed(
        appliance: Served, users: Users, proj: SharedFolder, tmp_path: Path) -> None:
    assert proj.folder_id in [e["id"] for e in shared_json(users.bob)]   # pins alice's key
    alice = users.name["alice"]
    with public_key_replaced(appliance.config, alice):
        fails(run_cairn(users.bob, "get", f"id:{proj.file_id}", tmp_path / "data.bin"),
              KeyPinError.exit_code, f"public key of user '{alice}' changed")
        fails(run_cairn(users.bob, "shared"), KeyPinError.exit_code, alice)
    assert not (tmp_path / "data.bin").exists()
    cairn_ok(users.bob, "get", f"id:{proj.file_id}", tmp_path / "data.bin")   # key back
