"""The agent's block cache (agent/blockcache.py) on real files: blocks come back verified or
not at all, the budget is never exceeded, the least recently used unpinned blocks go first,
pinned ones never (CacheFullError instead), and a restart keeps what is consistent."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import blake3
import pytest

from agent.blockcache import BlockCache
from agent.errors import CacheFullError, IntegrityError

KIB = 1024


def block(size: int = 10 * KIB) -> tuple[str, bytes]:
    data = os.urandom(size)
    return blake3.blake3(data).hexdigest(), data


def file_of(cache: BlockCache, block_id: str) -> Path:
    return cache.folder / "blocks" / block_id[:2] / block_id


def test_a_block_comes_back_and_an_unknown_one_is_missing(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    block_id, data = block()
    cache.put(block_id, data)
    cache.put(block_id, data)   # again: nothing more
    assert cache.get(block_id) == data
    assert cache.used_bytes == len(data)
    assert cache.get(block()[0]) is None
    with pytest.raises(ValueError):
        cache.get("../../etc/passwd")


def test_a_damaged_block_reads_as_missing_and_is_dropped(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    block_id, data = block()
    cache.put(block_id, data)
    damaged = bytearray(data)
    damaged[5000] ^= 1
    file_of(cache, block_id).write_bytes(bytes(damaged))
    assert cache.get(block_id) is None
    assert not file_of(cache, block_id).exists() and cache.used_bytes == 0
    cache.put(block_id, data)   # fetched again: fine
    assert cache.get(block_id) == data


def test_bytes_that_are_not_the_block_are_refused(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    block_id, _ = block()
    with pytest.raises(IntegrityError, match="does not match its id"):
        cache.put(block_id, os.urandom(100))
    assert cache.used_bytes == 0 and cache.get(block_id) is None


def test_the_least_recently_used_go_first_and_the_budget_holds(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 35 * KIB)
    first, second, third, fourth = (block() for _ in range(4))
    for block_id, data in (first, second, third):
        cache.put(block_id, data)
    assert cache.get(first[0]) == first[1]   # now the second is the oldest in use
    cache.put(*fourth)
    assert cache.used_bytes == 30 * KIB <= cache.budget
    assert cache.get(second[0]) is None
    assert all(cache.get(b[0]) == b[1] for b in (first, third, fourth))


def test_pinned_blocks_stay_and_a_full_cache_refuses_early(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 25 * KIB)
    kept, shared = block(), block()
    cache.put(*kept, pin=True)
    cache.put(*shared, pin=True)
    assert cache.pin([shared[0]]) == []          # a second file holds it too
    extra = block()
    with pytest.raises(CacheFullError, match="pinned"):
        cache.put(*extra)
    assert cache.get(extra[0]) is None and cache.used_bytes == 20 * KIB
    assert cache.pinned_bytes() == 20 * KIB
    cache.unpin([kept[0], shared[0]])            # shared is still pinned once
    cache.put(*extra)
    assert cache.get(kept[0]) is None and cache.get(shared[0]) == shared[1]
    with pytest.raises(CacheFullError, match="do not fit in the cache"):
        cache.put(*block(26 * KIB))
    missing = block()[0]
    assert cache.pin([missing]) == [missing]


def test_free_drops_unpinned_blocks_only(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    loose, pinned = block(), block()
    cache.put(*loose)
    cache.put(*pinned, pin=True)
    assert cache.free([loose[0], pinned[0]]) == 10 * KIB
    assert cache.get(loose[0]) is None and cache.get(pinned[0]) == pinned[1]


def test_a_restart_keeps_the_blocks_their_order_and_pins_and_cleans_up(tmp_path: Path
                                                                      ) -> None:
    cache = BlockCache(tmp_path, 35 * KIB)
    old, newer, pinned, vanished = (block() for _ in range(4))
    cache.put(*old)
    cache.put(*pinned, pin=True)
    cache.put(*newer)
    cache.close()
    # A crash's leftovers: a temp file, a renamed block with no row; a row with no file.
    file_of(cache, newer[0]).with_name(f".{newer[0]}.0000.part").write_bytes(b"half")
    stray = file_of(cache, vanished[0])
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(vanished[1])

    again = BlockCache(tmp_path, 35 * KIB)
    assert again.used_bytes == 30 * KIB
    assert not stray.exists()
    assert not list(tmp_path.glob("blocks/*/*.part"))
    again.put(*block())   # room is made by evicting the oldest unpinned: `old`
    assert again.get(old[0]) is None
    assert again.get(pinned[0]) == pinned[1] and again.get(newer[0]) == newer[1]
    file_of(again, newer[0]).unlink()
    again.close()
    third = BlockCache(tmp_path, 35 * KIB)
    assert third.used_bytes == 20 * KIB and third.get(newer[0]) is None


def test_threads_putting_at_once_never_exceed_the_budget(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 64 * KIB)
    errors: list[BaseException] = []
    peaks: list[int] = []

    def work() -> None:
        try:
            for _ in range(20):
                block_id, data = block(4 * KIB)
                cache.put(block_id, data)
                peaks.append(cache.used_bytes)
                cache.get(block_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert max(peaks) <= cache.budget
    on_disk = sum(p.stat().st_size for p in tmp_path.glob("blocks/*/*"))
    assert on_disk == cache.used_bytes <= cache.budget


def test_a_reader_that_checks_itself_drops_what_fails(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    block_id, data = block()
    cache.put(block_id, data, pin=True)
    damaged = bytearray(data)
    damaged[7] ^= 1
    file_of(cache, block_id).write_bytes(bytes(damaged))
    assert cache.get(block_id, verify=False) == bytes(damaged)   # the caller's check, then:
    cache.drop(block_id)
    assert cache.get(block_id) is None and cache.used_bytes == 0


def test_put_many_and_the_reserved_share(tmp_path: Path) -> None:
    cache = BlockCache(tmp_path, 100 * KIB)
    blocks = [block() for _ in range(5)]
    assert cache.put_many(blocks) == 5
    assert all(cache.has(block_id) for block_id, _ in blocks)
    cache.reserve(70 * KIB)                     # unsent writes take room: old blocks go
    assert cache.used_bytes + cache.reserved_bytes <= 100 * KIB
    assert not cache.has(blocks[0][0]) and cache.has(blocks[-1][0])
    cache.put(*block(), pin=True)
    cache.put(*block(), pin=True)
    cache.put(*block(), pin=True)
    with pytest.raises(CacheFullError):         # pinned + reserved cannot exceed the budget
        cache.reserve(80 * KIB)
    assert cache.reserved_bytes == 70 * KIB
