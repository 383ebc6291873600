"""What the agent does when the appliance's data is damaged or tampered with: the `cairn`
CLI (in-process) against the session's real `cairnd serve`, whose disks and database a
test edits directly (only the blocks and nodes of this module's own user).

- a block corrupted beyond what erasure coding repairs: `get` fails, the target untouched;
- a node's sealed metadata and wrapped key copied onto another node: refused;
- a node's block list pointed at another node's blocks: refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import cairn_ok, fails, make_user, run_cairn
from cairnd_helpers import Served, appliance_database, database_rows
from storage_fixtures import flip_byte, shard_files

from agent.crypto.blocks import BLOCK_SIZE
from agent.errors import ApiError, IntegrityError
from appliance.config import ApplianceConfig
from appliance.storage.shard_format import HEADER_SIZE

PARITY = 2


@pytest.fixture(scope="module")
def alice(appliance: Served, tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert (appliance.config.store.data_shards, appliance.config.store.parity_shards) == \
        (4, PARITY)
    return make_user(appliance, "alice").join(tmp_path_factory.mktemp("alice") / "home")


def node_id(home: Path, remote: str) -> str:
    [entry] = json.loads(cairn_ok(home, "ls", "--json", remote))
    return str(entry["id"])


def block_ids(config: ApplianceConfig, node: str) -> list[str]:
    return [row[0] for row in database_rows(
        config, "SELECT block_id FROM node_blocks WHERE node_id = ? ORDER BY position", node)]


def put_random(home: Path, tmp_path: Path, remote: str, size: int) -> bytes:
    content = os.urandom(size)
    local = tmp_path / remote.strip("/").replace("/", "_")
    local.write_bytes(content)
    cairn_ok(home, "put", local, remote)
    return content


def test_a_block_corrupted_beyond_repair_fails_the_download(
        appliance: Served, alice: Path, tmp_path: Path) -> None:
    config, _ = appliance
    content = put_random(alice, tmp_path, "/corrupt.bin", 1_000_000)  # one erasure-coded block
    [block] = block_ids(config, node_id(alice, "/corrupt.bin"))
    shards = shard_files(config.store.disks, block)
    assert len(shards) == 4 + PARITY and not any(s.location.packed for s in shards)
    target = tmp_path / "target.bin"
    target.write_bytes(b"the old copy")

    for shard in shards[:PARITY + 1]:          # one more than the parity can make up for
        flip_byte(shard.location, HEADER_SIZE + 1_000)

    fails(run_cairn(alice, "get", "/corrupt.bin", target), ApiError.exit_code,
          f"block {block}", "healthy shards")
    assert target.read_bytes() == b"the old copy"
    # At most a resumable partial file beside it, holding no unverified byte.
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("corrupt.bin", "target.bin")]
    assert all(p.name.endswith(".cairn-part") for p in leftovers), leftovers
    assert all(p.read_bytes().count(0) == p.stat().st_size for p in leftovers)
    assert content.count(0) < len(content)


def test_metadata_moved_to_another_node_is_refused(
        appliance: Served, alice: Path, tmp_path: Path) -> None:
    config, _ = appliance
    cairn_ok(alice, "mkdir", "/swap")
    a = put_random(alice, tmp_path, "/swap/a.txt", 2_000)
    put_random(alice, tmp_path, "/swap/b.txt", 2_000)
    a_id, b_id = node_id(alice, "/swap/a.txt"), node_id(alice, "/swap/b.txt")
    with appliance_database(config, write=True) as db:
        db.execute("UPDATE nodes SET metadata = (SELECT metadata FROM nodes WHERE id = ?), "
                   "wrapped_key = (SELECT wrapped_key FROM nodes WHERE id = ?) WHERE id = ?",
                   (a_id, a_id, b_id))

    fails(run_cairn(alice, "get", f"id:{b_id}", tmp_path / "b-copy"),
          IntegrityError.exit_code, f"node {b_id}", "failed authentication")
    fails(run_cairn(alice, "ls", "/swap"), IntegrityError.exit_code, b_id)
    assert not (tmp_path / "b-copy").exists()
    cairn_ok(alice, "get", f"id:{a_id}", tmp_path / "a-copy")   # A itself is intact
    assert (tmp_path / "a-copy").read_bytes() == a


def test_a_block_list_swapped_for_another_nodes_is_refused(
        appliance: Served, alice: Path, tmp_path: Path) -> None:
    config, _ = appliance
    size = BLOCK_SIZE + 5_000                    # two blocks each, of the same sizes
    cairn_ok(alice, "mkdir", "/lists")
    a = put_random(alice, tmp_path, "/lists/a.bin", size)
    put_random(alice, tmp_path, "/lists/b.bin", size)
    a_id, b_id = node_id(alice, "/lists/a.bin"), node_id(alice, "/lists/b.bin")
    a_blocks = block_ids(config, a_id)
    assert len(a_blocks) == 2 and set(a_blocks).isdisjoint(block_ids(config, b_id))
    with appliance_database(config, write=True) as db:
        db.execute("UPDATE node_blocks SET block_id = (SELECT x.block_id FROM node_blocks x "
                   "WHERE x.node_id = ? AND x.position = node_blocks.position) "
                   "WHERE node_id = ?", (a_id, b_id))
    assert block_ids(config, b_id) == a_blocks

    fails(run_cairn(alice, "get", "/lists/b.bin", tmp_path / "b-copy"),
          IntegrityError.exit_code, "serves other blocks", "than its metadata lists")
    assert not (tmp_path / "b-copy").exists()
    listing: list[dict[str, Any]] = json.loads(cairn_ok(alice, "ls", "--json", "/lists"))
    assert [(e["name"], e["size"]) for e in listing] == [("a.bin", size), ("b.bin", size)]
    cairn_ok(alice, "get", "/lists/a.bin", tmp_path / "a-copy")
    assert (tmp_path / "a-copy").read_bytes() == a
