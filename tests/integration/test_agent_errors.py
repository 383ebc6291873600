"""Errors a user of `cairn` understands: one line on stderr starting with `cairn: error:`,
a non-zero exit code (agent.errors), never a traceback — the CLI in-process against the
session's real `cairnd serve`, and the real binary as a subprocess where its exit code and
stderr are the point (an unreachable appliance, no home, the top-level help). Also
`--help` of every command, and a file that changes while it is being uploaded (in
process, with the send step wrapped to change it)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_helpers import (
    PASSPHRASE,
    User,
    agent_env,
    cairn_ok,
    fails,
    join,
    ls_json,
    make_user,
    run_cairn,
    run_cairn_binary,
)
from cairnd_helpers import Served, serving
from click.testing import CliRunner

from agent import operations as ops
from agent.cli import cli
from agent.crypto.blocks import BLOCK_SIZE
from agent.errors import (
    DiskFullError,
    FileChangedError,
    NotEnrolledError,
    RemoteNotFoundError,
    TransportError,
    UsageError,
    WrongPassphraseError,
)
from agent.home import AgentHome
from agent.upload import upload_file
from appliance.home import init_home

MiB = 1024 * 1024


@dataclass(frozen=True)
class Users:
    alice: Path
    bob: Path
    alice_user: User


@pytest.fixture(scope="module")
def users(appliance: Served, tmp_path_factory: pytest.TempPathFactory) -> Users:
    alice, bob = make_user(appliance, "alice"), make_user(appliance, "bob")
    return Users(alice.join(tmp_path_factory.mktemp("alice") / "home"),
                 bob.join(tmp_path_factory.mktemp("bob") / "home"), alice)


@pytest.mark.slow
def test_appliance_unreachable(tmp_path: Path) -> None:
    """The real binary: its exit code and its one line of stderr."""
    config = init_home(tmp_path / "appliance", disks=3, data_shards=2, parity_shards=1,
                       reserve_free_bytes=0, listen="127.0.0.1:0")
    with serving(config.home) as server:
        home = make_user(Served(config, server), "dora").join(tmp_path / "home")
        assert server.stop() == 0
    fails(run_cairn_binary(home, "ls"), TransportError.exit_code,
          f"cannot reach the appliance at {server.url}", "discovery is off")


def test_not_enrolled(tmp_path: Path) -> None:
    for command in (["ls"], ["get", "/x", str(tmp_path / "x")]):
        fails(run_cairn(tmp_path / "empty", *command), NotEnrolledError.exit_code,
              "has not joined", "cairn join")
    fails(run_cairn_binary(tmp_path / "empty", "unlock"), NotEnrolledError.exit_code,
          "has not joined", "cairn join")
    assert not (tmp_path / "x").exists()


def test_not_found(users: Users, tmp_path: Path) -> None:
    fails(run_cairn(users.alice, "get", "/nope", tmp_path / "nope"),
          RemoteNotFoundError.exit_code, "no such file or folder: /nope")
    fails(run_cairn(users.alice, "ls", "/nope/deeper"), RemoteNotFoundError.exit_code,
          "/nope")
    fails(run_cairn(users.alice, "get", "id:" + "0" * 32, tmp_path / "nope"),
          RemoteNotFoundError.exit_code, "not shared with you")
    fails(run_cairn(users.alice, "get", "id:xyz", tmp_path / "nope"), UsageError.exit_code,
          "32 hex digits")
    fails(run_cairn(users.alice, "get", "/", tmp_path / "no" / "such" / "folder"),
          6, "no such local folder")
    assert not (tmp_path / "nope").exists()


def test_not_shared_with_you(users: Users, tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("alice's")
    cairn_ok(users.alice, "put", tmp_path / "mine.txt", "/mine.txt")
    [mine] = ls_json(users.alice, "/mine.txt")
    fails(run_cairn(users.bob, "get", f"id:{mine['id']}", tmp_path / "stolen"),
          RemoteNotFoundError.exit_code, f"id:{mine['id']}", "not shared with you")
    fails(run_cairn(users.bob, "rm", f"id:{mine['id']}"), RemoteNotFoundError.exit_code,
          "not shared with you")
    assert not (tmp_path / "stolen").exists()


def test_wrong_passphrase_on_a_second_device_then_unlock(
        appliance: Served, users: Users, tmp_path: Path) -> None:
    alice = users.alice_user
    (tmp_path / "hello.txt").write_text("from the laptop")
    cairn_ok(users.alice, "put", tmp_path / "hello.txt", "/hello.txt")

    phone = tmp_path / "phone"
    fails(join(phone, appliance.url, alice.code(), passphrase="not the one",
               name="phone"), WrongPassphraseError.exit_code, "wrong passphrase")
    fails(run_cairn(phone, "ls"), NotEnrolledError.exit_code, "no keys", "cairn unlock")
    fails(run_cairn(phone, "join", alice.code(), "--url", appliance.url,
                    env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE)),
          UsageError.exit_code, "cairn unlock")

    unlocked = run_cairn(phone, "unlock", env=agent_env(CAIRN_PASSPHRASE=PASSPHRASE))
    assert unlocked.returncode == 0, unlocked.stderr
    assert unlocked.stdout.strip() == f"keys of user {alice.name} unlocked on this device"
    cairn_ok(phone, "get", "/hello.txt", tmp_path / "on-phone.txt")
    assert (tmp_path / "on-phone.txt").read_text() == "from the laptop"


def test_malformed_enrollment_code(appliance: Served, tmp_path: Path) -> None:
    for code in ("not-a-code", "", "AAAA-BBBB-CCCC-DDDD"):
        fails(join(tmp_path / "home", appliance.url, code), UsageError.exit_code,
              "enrollment code is not valid")
    assert not (tmp_path / "home" / "device.json").exists()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs under tmp_path, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                   check=True, timeout=30)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def test_disk_full_on_download(users: Users, small_tmpfs: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 * MiB))
    cairn_ok(users.alice, "put", big, "/big.bin")
    fails(run_cairn(users.alice, "get", "/big.bin", small_tmpfs / "big.bin"),
          DiskFullError.exit_code, "no space left", str(small_tmpfs))
    assert not (small_tmpfs / "big.bin").exists()


async def test_file_changed_while_uploading(users: Users, tmp_path: Path) -> None:
    path = tmp_path / "moving.bin"
    path.write_bytes(os.urandom(3 * BLOCK_SIZE))
    changed: list[int] = []

    async with ops.session(AgentHome(users.alice)) as tree:
        send = tree.connection.put_block

        def send_then_change(url: str, data: bytes) -> list[str]:
            if not changed:   # the first block goes out; then the file changes
                changed.append(1)
                path.write_bytes(os.urandom(3 * BLOCK_SIZE))
            return send(url, data)

        tree.connection.put_block = send_then_change  # type: ignore[method-assign]
        target = await tree.target("/moving.bin")
        with pytest.raises(FileChangedError, match="changed while it was being"):
            await upload_file(tree, path, target)
    assert changed

    # The interrupted upload is resumed by the next put, with the file's new content.
    cairn_ok(users.alice, "put", path, "/moving.bin")
    cairn_ok(users.alice, "get", "/moving.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == path.read_bytes()


COMMANDS = ["join", "unlock", "put", "get", "ls", "mkdir", "rm", "mv", "trash", "restore",
            "share", "unshare", "shared", "sync", "status", "approve", "devices",
            "mount", "umount", "pin", "unpin", "free"]          # the drive's (fuse/cli.py)


def test_help_of_every_command(tmp_path: Path) -> None:
    top = run_cairn_binary(tmp_path / "home", "--help")
    assert top.returncode == 0 and "Usage: cairn" in top.stdout, top.stderr
    for command in COMMANDS:
        assert command in top.stdout
    assert sorted(cli.commands) == sorted(COMMANDS)   # a new command gets a help check
    runner = CliRunner()
    for command in COMMANDS:
        result = runner.invoke(cli, ["--home", str(tmp_path / "home"), command, "--help"],
                               prog_name="cairn")
        assert result.exit_code == 0, (command, result.output)
        assert result.output.startswith(f"Usage: cairn {command}"), result.output
        assert (cli.commands[command].help or "").split("\n")[0][:30] in result.output
    assert not (tmp_path / "home").exists()
