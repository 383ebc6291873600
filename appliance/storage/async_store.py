"""The block store for trio code: every call runs in a worker thread, so hashing, erasure
coding and disk I/O never block the event loop. A capacity limiter bounds the threads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import trio

from appliance.errors import CairnApplianceError
from appliance.storage.blockstore import BlockStore, PutResult, RepairResult
from appliance.storage.disk import DiskStatus

T = TypeVar("T")
DEFAULT_THREADS = 16


class AsyncBlockStore:
    def __init__(self, store: BlockStore, max_threads: int = DEFAULT_THREADS) -> None:
        self.store = store
        self._limiter = trio.CapacityLimiter(max_threads)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def put(self, block_id: str, data: bytes) -> PutResult:
        return await self._run(lambda: self.store.put(block_id, data))

    async def put_many(self, blocks: Mapping[str, bytes]
                       ) -> dict[str, PutResult | CairnApplianceError]:
        return await self._run(lambda: self.store.put_many(blocks))

    async def get(self, block_id: str) -> bytes:
        return await self._run(lambda: self.store.get(block_id))

    async def has(self, block_id: str) -> bool:
        return await self._run(lambda: self.store.has(block_id))

    async def delete(self, block_id: str) -> int:
        return await self._run(lambda: self.store.delete(block_id))

    async def repair(self, block_id: str) -> RepairResult:
        return await self._run(lambda: self.store.repair(block_id))

    async def disk_status(self, count_shards: bool = True) -> list[DiskStatus]:
        return await self._run(lambda: self.store.disk_status(count_shards))

    async def run_sync(self, fn: Callable[[], T]) -> T:
        """Any other blocking store work (scrub steps, queue reads) in the same threads."""
        return await self._run(fn)

    def close(self) -> None:
        self.store.close()
