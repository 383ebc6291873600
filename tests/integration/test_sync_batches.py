"""The sync engine's small-file batches against the session's appliance: a batch whose
blocks add up to more than one `POST /blocks/read` may carry is fetched in several."""

from __future__ import annotations

import os
from pathlib import Path

from agent_helpers import make_user
from cairnd_helpers import Served

from agent import operations as ops
from agent.crypto.blocks import TAG_BYTES
from agent.home import AgentHome
from agent.sync.batch import (
    BATCH_FILES,
    SMALL_FILE,
    SmallDownload,
    SmallUpload,
    download_small,
    read_requests,
    upload_small,
)
from protocol.limits import MAX_BATCH_READ_BYTES
from protocol.models import FeedSpan


def test_read_requests_stay_within_the_appliances_budget() -> None:
    size = (SMALL_FILE + TAG_BYTES)
    sizes = {f"{n:064x}": size for n in range(BATCH_FILES)}
    requests = read_requests(sizes)
    assert BATCH_FILES * size > MAX_BATCH_READ_BYTES       # the case that needs splitting
    assert [block for request in requests for block in request] == list(sizes)
    assert all(sum(sizes[b] for b in request) <= MAX_BATCH_READ_BYTES for request in requests)
    assert len(requests) == -(-BATCH_FILES * size // MAX_BATCH_READ_BYTES)   # no more than needed
    assert read_requests({}) == []


async def test_a_full_batch_of_the_largest_small_files_downloads_in_one_pass(
        appliance: Served, tmp_path: Path) -> None:
    user = make_user(appliance, "batches")
    home = user.join(tmp_path / "device", "device")
    count = BATCH_FILES
    assert count * (SMALL_FILE + TAG_BYTES) > MAX_BATCH_READ_BYTES
    sources = tmp_path / "sources"
    sources.mkdir()
    contents = {}
    for n in range(count):
        contents[f"f{n:03}.bin"] = os.urandom(SMALL_FILE)
        (sources / f"f{n:03}.bin").write_bytes(contents[f"f{n:03}.bin"])
    async with ops.session(AgentHome(home)) as tree:
        root = await tree.root()
        uploads = [SmallUpload(sources / name, name, root, None) for name in contents]
        await upload_small(tree, uploads, "device")
        assert [u.error for u in uploads] == [None] * count
        nodes = await tree.children(root)
        assert len(nodes) == count
        target = tmp_path / "copies"
        target.mkdir()
        downloads = [SmallDownload(node, target / node.name, lambda: None) for node in nodes]
        await download_small(tree, downloads)
    assert [d.error for d in downloads] == [None] * count       # none left for a next pass
    assert {p.name: p.read_bytes() for p in target.iterdir()} == contents


async def test_a_small_file_goes_up_in_one_request_and_one_change(
        appliance: Served, tmp_path: Path) -> None:
    """Its block rides inline in POST /batch/files (API 1.1): the file is uploaded at once,
    so other devices see one change, not an `uploading` one and then an `uploaded` one."""
    user = make_user(appliance, "inline")
    home = user.join(tmp_path / "device", "device")
    (tmp_path / "edit.txt").write_bytes(b"a small edit")
    async with ops.session(AgentHome(home)) as tree:
        root = await tree.root()
        start = (await tree.api.me()).latest_cursor
        assert tree.api.supports("1.1")
        upload = SmallUpload(tmp_path / "edit.txt", "edit.txt", root, None)
        spans = await upload_small(tree, [upload], "device")
        assert upload.error is None and upload.node is not None
        assert upload.node.status == "uploaded"
        changes = [change async for page in tree.api.change_pages(start)
                   for change in page.changes]
        assert [c.node_id for c in changes] == [upload.node.id]
        # ... and says which feed positions it filled: the mirror may pass them unpulled
        latest = (await tree.api.me()).latest_cursor
        assert spans == [FeedSpan(before=start, after=latest, added=1)]
