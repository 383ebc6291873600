"""The home survives its disk: the appliance's home (database, TLS key pair, secrets,
config) is deleted whole, `cairnd recover` rebuilds it from the copies on the data disks,
and the same devices list, fetch and sync everything byte-exact, as if nothing happened.

The second test kills the appliance (-9) while devices upload, with copies so rare that
the copy holds none of those uploads: the devices notice the recovered appliance's new
epoch and send again what it lost, and nothing is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from agent_helpers import cairn_ok, make_user, write
from sync_helpers import Device, devices_of, link_to, stop_all, wait_converged, wait_for

from appliance.config import ApplianceConfig, load_config, write_config
from appliance.home import init_home
from appliance.home_copies import copies_on
from tests.cairnd_helpers import Served, database_rows, free_port, run_cairnd, serving

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    """Six disk folders outside the home: losing the home keeps them."""
    paths = [tmp_path / "disks" / f"disk{i}" for i in range(6)]
    for path in paths:
        path.mkdir(parents=True)
    return paths


def new_appliance(tmp_path: Path, disks: list[Path], **changes: float) -> ApplianceConfig:
    config = init_home(tmp_path / "home", disk_paths=disks, reserve_free_bytes=0,
                       listen=f"127.0.0.1:{free_port()}")
    if changes:
        config = replace(config, **changes)   # type: ignore[arg-type]
        write_config(config)
    return config


def recover(new_home: Path, disks: list[Path]) -> str:
    """`cairnd recover`, the disks given in another order than at init."""
    args = [a for disk in reversed(disks) for a in ("--disk-path", str(disk))]
    result = run_cairnd("recover", "--home", new_home, *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"Start it with: cairnd serve --home {new_home}"
    return result.stdout


def newest_change(config: ApplianceConfig) -> int:
    """The cursor of the newest change in the appliance's database (its history's end)."""
    return int(database_rows(config, "SELECT coalesce(max(cursor), 0) FROM changes")[0][0])


def copied_on(disks: list[Path], sequence: int) -> int:
    """On how many of DISKS the home's copy SEQUENCE is complete."""
    return sum(any(seq == sequence for seq, _ in copies_on(disk)) for disk in disks)


def sample_files(folder: Path) -> dict[str, bytes]:
    files = {f"small/{i:02d}.txt": os.urandom(1 + i * 7919 % 200_000) for i in range(30)}
    files["big.bin"] = os.urandom(9 * 1024 * 1024 + 123)       # three blocks, erasure-coded
    files["deep/er/still.txt"] = b"a nested file"
    for name, data in files.items():
        write(folder / name, data)
    os.symlink("big.bin", folder / "link-to-big")
    return files


def test_the_whole_home_deleted_is_recovered_from_the_disks(tmp_path: Path,
                                                             disks: list[Path]) -> None:
    config = new_appliance(tmp_path, disks)
    with serving(config.home, "--listen", config.listen) as server:
        alice = make_user(Served(config, server), "alice")
        bob = make_user(Served(config, server), "bob")
        laptop, desktop = devices_of(alice, tmp_path, "laptop", "desktop")
        (bob_device,) = devices_of(bob, tmp_path, "bobs-phone")
        files = sample_files(laptop.folder)
        try:
            laptop.start()
            desktop.start()
            wait_converged(laptop, desktop, timeout=120)
        finally:
            stop_all(laptop, desktop)
        cairn_ok(laptop.home, "share", "/deep", bob.name)
        before = {
            "ls": cairn_ok(desktop.home, "ls", "/small", "--json"),
            "shared": cairn_ok(bob_device.home, "shared", "--json"),
        }
        fingerprint, appliance_id = server.fingerprint, server.appliance_id
        assert server.stop() == 0                          # a clean stop: copied once more

    shutil.rmtree(config.home)                             # the system disk is gone
    new_home = tmp_path / "new-home"
    report = recover(new_home, disks)
    assert f"recovered appliance {appliance_id}" in report and "at a clean stop" in report

    with serving(new_home, "--listen", config.listen) as server:
        assert (server.fingerprint, server.appliance_id) == (fingerprint, appliance_id)
        # Same users, devices, grants and trees: the devices' tokens and pins still work.
        assert cairn_ok(desktop.home, "ls", "/small", "--json") == before["ls"]
        assert cairn_ok(bob_device.home, "shared", "--json") == before["shared"]
        for name, data in files.items():
            target = tmp_path / "fetched" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            cairn_ok(desktop.home, "get", f"/{name}", target)
            assert target.read_bytes() == data, name
        shared_id = json.loads(before["shared"])[0]["id"]
        cairn_ok(bob_device.home, "get", f"id:{shared_id}", tmp_path / "bobs")
        assert (tmp_path / "bobs" / "er" / "still.txt").read_bytes() == b"a nested file"

        # ... and keep syncing, both ways.
        try:
            laptop.start()
            desktop.start()
            write(desktop.folder / "after.txt", "written after the recovery")
            tree = wait_converged(laptop, desktop, timeout=120)
        finally:
            stop_all(laptop, desktop)
        assert tree["after.txt"] == b"written after the recovery"
        assert tree["link-to-big"] == link_to("big.bin")
        assert all(tree[name] == data for name, data in files.items())
        assert server.stop() == 0
        assert "Traceback" not in server.stderr()


def test_uploads_the_copy_lacks_are_sent_again_by_the_devices(tmp_path: Path,
                                                              disks: list[Path]) -> None:
    """Copies made only at start and at a clean stop; then an edit and a burst of new
    files, and kill -9 with uploads in flight: the recovered appliance knows none of them,
    and the running devices put everything back."""
    config = new_appliance(tmp_path, disks, home_copy_interval_s=3600.0)
    devices: list[Device] = []
    try:
        with serving(config.home, "--listen", config.listen) as server:
            alice = make_user(Served(config, server), "alice")
            devices = devices_of(alice, tmp_path, "laptop", "desktop")
            laptop, desktop = devices
            files = sample_files(laptop.folder)
            laptop.start()
            desktop.start()
            wait_converged(laptop, desktop, timeout=120)
            assert server.stop() == 0     # the copy now holds the user, devices and files
        stopped_at = newest_change(config)
        start_copy = max(seq for disk in disks for seq, _ in copies_on(disk)) + 1
        with serving(config.home, "--listen", config.listen) as server:
            # The copy made at start, before the edit (else the kill below may fall while
            # it is written, and leave it on some disks only: then the recovery takes it
            # on one day, the clean stop's on another).
            wait_for(lambda: copied_on(disks, start_copy) == config.store.parity_shards + 1,
                     30, "the copy made at start")
            write(desktop.folder / "small/00.txt", "edited on the desktop")
            more = {f"burst/{i}.bin": os.urandom(70_000 + i) for i in range(20)}
            for name, data in more.items():
                write(laptop.folder / name, data)
            wait_for(lambda: "uploaded" in laptop.log_text().split("burst/", 1)[-1],
                     30, "the burst's first uploads")
            server.stop(signal.SIGKILL)   # some of the burst acknowledged, some in flight
        shutil.rmtree(config.home)
        new_home = tmp_path / "new-home"
        report = recover(new_home, disks)
        # the copy from before the edit: the history as the clean stop left it
        assert f"(copy {start_copy}," in report
        assert newest_change(load_config(new_home)) == stopped_at, report
        with serving(new_home, "--listen", config.listen) as server:
            tree = wait_converged(laptop, desktop, timeout=180)
            expected = {**files, **more, "small/00.txt": b"edited on the desktop"}
            for name, data in expected.items():
                assert tree.get(name) == data, name
            assert not [p for p in tree if "conflicted copy" in p], sorted(tree)
            for name, data in expected.items():      # and on the appliance, byte-exact
                target = tmp_path / "fetched" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                cairn_ok(desktop.home, "get", f"/{name}", target)
                assert target.read_bytes() == data, name
            assert "restored from an older copy" in laptop.log_text() + desktop.log_text()
            stop_all(*devices)
            assert server.stop() == 0
    finally:
        stop_all(*devices)
