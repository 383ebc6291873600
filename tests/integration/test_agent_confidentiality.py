"""No plaintext reaches the appliance: files and folders whose names and contents carry
random markers are uploaded with the `cairn` CLI (in-process), the server (this test's own)
is stopped, and every byte under the appliance's home — disks (shard files and small-shard
packs), the database with its WAL, logs, configuration — is searched for the markers."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from agent_helpers import cairn_ok, make_user
from cairnd_helpers import Served, serving

from appliance.home import init_home

MiB = 1024 * 1024


def encodings(marker: str) -> list[bytes]:
    """The byte forms a marker could leak in: UTF-8, UTF-16 (either order), hex, and base64
    at each of the three alignments (the part fixed whatever precedes it)."""
    raw = marker.encode()
    forms = [raw, marker.encode("utf-16-le"), marker.encode("utf-16-be"), raw.hex().encode()]
    for shift in range(3):
        encoded = base64.b64encode(bytes(shift) + raw)
        forms.append(encoded[4:-4])
    return forms


def files_containing(root: Path, needles: list[bytes]) -> list[Path]:
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(needle in data for needle in needles):
                found.append(path)
    return found


def test_no_name_or_content_in_plaintext_on_the_appliance(tmp_path: Path) -> None:
    name_marker = f"nm{secrets.token_hex(12)}"
    content_marker = f"cm{secrets.token_hex(12)}"
    device_marker = f"dm{secrets.token_hex(12)}"   # device names are plaintext, by design

    local = tmp_path / f"folder-{name_marker}"
    (local / f"sub-{name_marker}").mkdir(parents=True)
    small = (content_marker + "\n").encode() * 300               # packed replicas
    large = (content_marker.encode() * (5 * MiB // len(content_marker)))  # erasure-coded
    (local / f"note-{name_marker}.txt").write_bytes(small)
    (local / f"sub-{name_marker}" / f"big-{name_marker}.bin").write_bytes(large)
    (local / "plain.txt").write_text(f"a line with {content_marker} in it\n")

    config = init_home(tmp_path / "appliance", reserve_free_bytes=0, listen="127.0.0.1:0")
    with serving(config.home) as server:
        home = make_user(Served(config, server), "alice").join(
            tmp_path / "agent", f"laptop-{device_marker}")
        cairn_ok(home, "put", local, "/")
        cairn_ok(home, "mkdir", f"/empty-{name_marker}")
        cairn_ok(home, "get", f"/folder-{name_marker}", tmp_path / "back")
        assert server.stop() == 0
        assert "Traceback" not in server.stderr()

    back = tmp_path / "back" / f"sub-{name_marker}" / f"big-{name_marker}.bin"
    assert back.read_bytes() == large   # what the walk must not find did get there
    home_files = [p for p in config.home.rglob("*") if p.is_file()]
    shard_files = [p for p in home_files if p.parent.parent.parent.name == "shards"]
    assert len(shard_files) >= 2 * 6, "the large file's two blocks are on the disks"
    assert any(p.name == "small-shards.sqlite" for p in home_files)

    # The walk does find what is stored in plaintext: the device's name, in the database.
    assert any(p.name.startswith(config.database.name)
               for p in files_containing(config.home, encodings(device_marker)[:1]))
    assert files_containing(config.home, encodings(name_marker)) == []
    assert files_containing(config.home, encodings(content_marker)) == []
