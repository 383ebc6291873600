"""`cairnd fsck` as a user runs it, on a home that real `cairn put`s filled: clean after the
uploads (beside the serving appliance and with it stopped), a block lost on every disk and
an orphan block detected, the repair sending the file back to `uploading` so that the next
`cairn put` of it sends the block again (then read back byte-exact), and the orphan
collected only once the grace period has passed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent_helpers import cairn_ok, ls_json, make_user, write
from cairnd_helpers import Served, database_rows, free_port, run_cairnd, serving
from storage_fixtures import shard_files

from appliance.config import ApplianceConfig, load_config, write_config
from appliance.home import init_home
from appliance.storage.blockstore import BlockStore, block_id_of
from appliance.storage.repair_queue import RepairQueue

EXIT_PROBLEMS = 4


def fsck(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`cairnd fsck --home HOME --json ARGS`: the process and its report."""
    result = run_cairnd("fsck", "--home", home, "--json", *args, timeout=120)
    assert result.stdout.startswith("{"), result.stderr
    return result, json.loads(result.stdout)


def found(report: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {kind: (p["found"], p["repaired"]) for kind, p in report["problems"].items()
            if p["found"]}


def store_of(config: ApplianceConfig) -> BlockStore:
    return BlockStore(config.store, RepairQueue(config.database))


def test_fsck_finds_and_repairs_a_lost_block_and_an_orphan(tmp_path: Path) -> None:
    config = init_home(tmp_path / "appliance", reserve_free_bytes=0)
    listen = ("--listen", f"127.0.0.1:{free_port()}")   # the agent finds it after a restart
    big = os.urandom(300_000)                            # one erasure-coded block
    small = [os.urandom(2000 + i) for i in range(3)]     # packed replicas
    with serving(config.home, *listen) as server:
        alice = make_user(Served(config, server), "alice")
        laptop = alice.join(tmp_path / "laptop")
        cairn_ok(laptop, "put", write(tmp_path / "big.bin", big), "/docs/big.bin")
        for i, data in enumerate(small):
            cairn_ok(laptop, "put", write(tmp_path / f"s{i}", data), f"/docs/s{i}")

        inside, report = fsck(config.home)              # runs inside the server
        assert inside.returncode == 0 and report["clean"], report
        repaired, report = fsck(config.home, "--repair")  # under the server's block locks
        assert repaired.returncode == 0 and report["clean"], report
        assert server.stderr().count("admin socket: fsck") == 2
        assert server.stop() == 0

    result, report = fsck(config.home)
    assert result.returncode == 0 and report["clean"] and found(report) == {}
    assert report["checked"]["referenced_blocks"] == 4
    assert report["checked"]["store_blocks"] == 4
    assert report["checked"]["nodes"] == 6                # root, docs, four files

    [(lost, node_id)] = database_rows(      # big.bin's one block (ciphertext: above 64 KiB)
        config, "SELECT block_id, node_id FROM node_blocks WHERE size > 65536")
    for shard in shard_files(config.store.disks, lost):  # gone from every disk
        shard.location.delete()
    orphan = os.urandom(100_000)
    store = store_of(config)
    try:
        store.put(block_id_of(orphan), orphan)           # stored, its commit never came
    finally:
        store.close()

    human = run_cairnd("fsck", "--home", config.home)
    assert human.returncode == EXIT_PROBLEMS, human.stdout + human.stderr
    assert "1 problems remain" in human.stdout
    assert "missing_block: 1" in human.stdout and node_id in human.stdout
    assert "orphan_block: 1" in human.stdout

    repaired, report = fsck(config.home, "--repair")
    assert repaired.returncode == 0 and report["clean"], report
    assert found(report) == {"missing_block": (1, 1), "uploaded_missing_blocks": (1, 1),
                             "orphan_block": (1, 0)}
    assert database_rows(config, "SELECT status FROM nodes WHERE id = ?", node_id) == \
        [("uploading",)]

    with serving(config.home, *listen) as server:
        [entry] = [e for e in ls_json(laptop, "/docs") if e["name"] == "big.bin"]
        assert entry["status"] == "uploading"
        cairn_ok(laptop, "put", tmp_path / "big.bin", "/docs/big.bin")   # sends it again
        cairn_ok(laptop, "get", "/docs/big.bin", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == big
        assert server.stop() == 0

    result, report = fsck(config.home)
    assert result.returncode == 0 and found(report) == {"orphan_block": (1, 0)}

    write_config(replace(load_config(config.home), gc_grace_s=1.0))
    time.sleep(1.5)                                       # the orphan's grace runs out
    result, report = fsck(config.home, "--repair")
    assert result.returncode == 0 and found(report) == {"orphan_block": (1, 1)}
    store = store_of(config)
    try:
        assert not store.has(block_id_of(orphan)) and store.has(lost)
    finally:
        store.close()
    result, report = fsck(config.home)
    assert result.returncode == 0 and found(report) == {}


def test_fsck_of_a_home_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    result = run_cairnd("fsck", "--home", tmp_path / "none")
    assert result.returncode == 2
    assert result.stderr.startswith("cairnd: error: ") and result.stderr.count("\n") == 1
    assert "Exit status" in run_cairnd("fsck", "--help").stdout
