"""`cairnd init`, `cairnd disks` and `cairnd scrub` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import apsw
import pytest
from cairnd_helpers import MakeHome, cairnd_env

from appliance.config import load_config
from appliance.storage.disk import MARKER_NAME
from appliance.tls import read_certificate_fingerprint

Cairnd = Callable[..., CompletedProcess[str]]


def assert_one_line_error(result: CompletedProcess[str], exit_code: int, text: str) -> None:
    assert result.returncode == exit_code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cairnd: error: ")
    assert text in lines[0]
    assert "Traceback" not in result.stderr


def test_init_creates_a_complete_home(tmp_path: Path, cairnd: Cairnd) -> None:
    home = tmp_path / "appliance"
    result = cairnd("init", "--home", home, "--disks", "5", "--data-shards", "3",
                    "--parity-shards", "2", "--listen", "127.0.0.1:9443")
    assert result.returncode == 0, result.stderr
    config = load_config(home)
    assert (config.store.data_shards, config.store.parity_shards) == (3, 2)
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9443)
    assert [d.name for d in config.store.disks] == [f"disk{i}" for i in range(5)]
    for disk in config.store.disks:
        assert disk.path == home / "disks" / disk.name
        assert (disk.path / MARKER_NAME).is_file()
        assert not disk.require_mount
    # The database exists, in WAL mode, with the schema migrated.
    db = apsw.Connection(str(home / "appliance.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    db.close()
    # TLS files, key private; the fingerprint printed is the certificate's.
    assert stat.S_IMODE((home / "tls" / "key.pem").stat().st_mode) == 0o600
    fingerprint = read_certificate_fingerprint(home / "tls" / "cert.pem")
    assert f"sha256 {fingerprint}" in result.stdout
    assert config.appliance_id in result.stdout


def test_init_says_how_to_start_it_unless_told_not_to(tmp_path: Path, cairnd: Cairnd) -> None:
    told = cairnd("init", "--home", tmp_path / "a")
    assert told.stdout.splitlines()[-1] == f"Start it with: cairnd serve --home {tmp_path / 'a'}"
    quiet = cairnd("init", "--home", tmp_path / "b", "--no-serve-hint")   # make run's
    assert quiet.returncode == 0, quiet.stderr
    assert "Start it with" not in quiet.stdout
    assert quiet.stdout.splitlines()[-1].startswith("  config:")


def test_defaults_are_six_disks_four_plus_two(tmp_path: Path, cairnd: Cairnd) -> None:
    home = tmp_path / "h"
    assert cairnd("init", "--home", home).returncode == 0
    config = load_config(home)
    assert len(config.store.disks) == 6
    assert (config.store.data_shards, config.store.parity_shards) == (4, 2)
    assert config.listen == "127.0.0.1:8443"


def test_home_from_environment(tmp_path: Path) -> None:
    from cairnd_helpers import run_cairnd

    home = tmp_path / "from-env"
    result = run_cairnd("init", "--disks", "3", "--data-shards", "2", "--parity-shards", "1",
                        env=cairnd_env(CAIRN_APPLIANCE_HOME=str(home)))
    assert result.returncode == 0, result.stderr
    assert (home / "config.toml").is_file()


def test_refuses_to_overwrite(tmp_path: Path, cairnd: Cairnd) -> None:
    home = tmp_path / "h"
    assert cairnd("init", "--home", home, "--disks", "3", "--data-shards", "2",
                  "--parity-shards", "1").returncode == 0
    before = (home / "config.toml").read_bytes()
    result = cairnd("init", "--home", home)
    assert_one_line_error(result, 2, "already holds an appliance")
    assert (home / "config.toml").read_bytes() == before


def test_refuses_a_non_empty_folder(tmp_path: Path, cairnd: Cairnd) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    assert_one_line_error(cairnd("init", "--home", home), 2, "is not empty")
    assert sorted(os.listdir(home)) == ["notes.txt"]


def test_empty_folder_is_fine(tmp_path: Path, cairnd: Cairnd) -> None:
    home = tmp_path / "h"
    home.mkdir()
    assert cairnd("init", "--home", home).returncode == 0


@pytest.mark.parametrize(("args", "text"), [
    (("--disks", "5"), "4 data + 2 parity shards need at least 6 disks"),
    (("--data-shards", "0"), "--data-shards must be at least 1"),
    (("--parity-shards", "0"), "--parity-shards must be at least 1"),
    (("--listen", "localhost"), "expected HOST:PORT"),
    (("--data-shards", "1", "--parity-shards", "1", "--disk-path", "/nonexistent/cairn-a",
      "--disk-path", "/nonexistent/cairn-b"), "is not an existing folder"),
])
def test_impossible_settings_write_nothing(tmp_path: Path, cairnd: Cairnd,
                                           args: tuple[str, ...], text: str) -> None:
    home = tmp_path / "h"
    assert_one_line_error(cairnd("init", "--home", home, *args), 2, text)
    assert not home.exists()


def test_existing_disk_paths(tmp_path: Path, cairnd: Cairnd) -> None:
    paths = [tmp_path / f"mnt{i}" for i in range(3)]
    for path in paths:
        path.mkdir()
    home = tmp_path / "h"
    args = [a for p in paths for a in ("--disk-path", str(p))]
    result = cairnd("init", "--home", home, "--data-shards", "2", "--parity-shards", "1", *args)
    assert result.returncode == 0, result.stderr
    config = load_config(home)
    assert [d.path for d in config.store.disks] == paths
    assert not (home / "disks").exists()
    assert all((p / MARKER_NAME).is_file() for p in paths)
    # Mismatched --disks, and a folder given twice.
    assert_one_line_error(cairnd("init", "--home", tmp_path / "h2", "--disks", "4", *args), 2,
                          "does not match the 3 --disk-path values")
    twice = ["--data-shards", "2", "--parity-shards", "1", *args, "--disk-path", str(paths[0])]
    assert_one_line_error(cairnd("init", "--home", tmp_path / "h3", *twice), 2, "given twice")


def test_failed_init_leaves_nothing_behind(tmp_path: Path, cairnd: Cairnd) -> None:
    # A disk folder of another appliance makes format_disk refuse, midway through init.
    paths = [tmp_path / f"mnt{i}" for i in range(3)]
    for path in paths:
        path.mkdir()
    (paths[2] / "someone-elses-file").write_text("x")
    home = tmp_path / "h"
    args = [a for p in paths for a in ("--disk-path", str(p))]
    result = cairnd("init", "--home", home, "--data-shards", "2", "--parity-shards", "1", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("cairnd: error: ")
    assert not home.exists()
    # The disks formatted before the failure were given back empty: a retry works.
    assert [os.listdir(p) for p in paths] == [[], [], ["someone-elses-file"]]
    (paths[2] / "someone-elses-file").unlink()
    result = cairnd("init", "--home", home, "--data-shards", "2", "--parity-shards", "1", *args)
    assert result.returncode == 0, result.stderr


def test_disks_json_and_table(appliance_home: MakeHome, cairnd: Cairnd) -> None:
    config = appliance_home(disks=4, data_shards=2, parity_shards=1)
    result = cairnd("disks", "--home", config.home, "--json")
    assert result.returncode == 0, result.stderr
    disks = json.loads(result.stdout)
    assert [d["name"] for d in disks] == ["disk0", "disk1", "disk2", "disk3"]
    for disk in disks:
        assert disk["state"] == "ok"
        assert disk["shard_count"] == 0
        assert disk["free_bytes"] > 0
        assert disk["path"] == str(config.home / "disks" / disk["name"])

    # A deleted disk folder shows as missing, in both forms.
    (config.home / "disks" / "disk1" / MARKER_NAME).unlink()
    for child in (config.home / "disks" / "disk1").iterdir():
        child.rmdir()
    (config.home / "disks" / "disk1").rmdir()
    disks = json.loads(cairnd("disks", "--home", config.home, "--json").stdout)
    assert [d["state"] for d in disks] == ["ok", "missing", "ok", "ok"]
    table = cairnd("disks", "--home", config.home).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATE", "SHARDS", "FREE", "SIZE", "PATH"]
    assert table[2].split()[:2] == ["disk1", "missing"]


def test_scrub_an_empty_store(appliance_home: MakeHome, cairnd: Cairnd) -> None:
    config = appliance_home(disks=3, data_shards=2, parity_shards=1)
    result = cairnd("scrub", "--home", config.home)
    assert result.returncode == 0, result.stderr
    assert "checked 0 blocks" in result.stdout
    report = json.loads(cairnd("scrub", "--home", config.home, "--json").stdout)
    assert report["checked"] == 0 and report["unrecoverable"] == 0


def test_commands_on_a_missing_home(tmp_path: Path, cairnd: Cairnd) -> None:
    for command in ("disks", "scrub", "fsck", "serve"):
        assert_one_line_error(cairnd(command, "--home", tmp_path / "none"), 2,
                              "does not exist")


def test_help_has_examples(cairnd: Cairnd) -> None:
    result = cairnd("--help")
    assert result.returncode == 0
    for command in ("init", "serve", "disks", "scrub", "fsck", "recover"):
        assert f"cairnd {command} --home" in result.stdout
    assert "CAIRN_APPLIANCE_HOME" in result.stdout
