"""Plaintext blocks of remote files, on demand: a small RAM cache of decrypted blocks, then
the on-disk cache of ciphertext blocks (agent.blockcache, verified on read), then the
appliance (pre-signed URLs, cached per node version until they expire).

Every block fetched is checked against its id (BLAKE3 of the ciphertext), decrypted and
checked against its plain hash before a byte of it is used. A block wanted by several
readers at once is fetched once. Reads that the appliance cannot answer fail fast: the
URL request has FETCH_TIMEOUT_S, and the drive's connection for reads retries once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import trio

from agent.api import Api
from agent.blockcache import BlockCache
from agent.client import Connection
from agent.crypto.blocks import BlockRef, decrypt_block
from agent.errors import CacheFullError, CairnAgentError, IntegrityError, TransportError

log = logging.getLogger("cairn.drive")

RAM_BLOCKS = 8           # decrypted blocks kept in memory (4 MiB each at most)
PREFETCH_BLOCKS = 4      # blocks read ahead of a sequential reader
FETCH_TIMEOUT_S = 1.0    # an unreachable appliance must not hang a read
URL_MARGIN_S = 30        # URLs this close to expiring are asked for again


@dataclass
class _Urls:
    version: int
    expires_at: float
    by_block: dict[str, str]


class BlockSource:
    def __init__(self, cache: BlockCache, connection: Connection, api: Api) -> None:
        self.cache = cache
        self.connection = connection
        self.api = api
        self._ram: OrderedDict[str, bytes] = OrderedDict()
        self._urls: dict[str, _Urls] = {}
        self._inflight: dict[str, trio.Event] = {}
        self._failed: dict[str, CairnAgentError] = {}
        self.fetched_blocks = 0

    async def plaintext(self, node_id: str, version: int, ref: BlockRef) -> bytes:
        """The decrypted block REF of NODE_ID (at VERSION); raises CairnAgentError."""
        block_id = ref.id_hex
        while True:
            found = self._ram.get(block_id)
            if found is not None:
                self._ram.move_to_end(block_id)
                return found
            waiting = self._inflight.get(block_id)
            if waiting is None:
                break
            await waiting.wait()
            failed = self._failed.pop(block_id, None)
            if failed is not None and block_id not in self._ram:
                raise failed
        done = self._inflight[block_id] = trio.Event()
        try:
            plain = await self._load(node_id, version, ref)
        except CairnAgentError as exc:
            self._failed[block_id] = exc
            raise
        finally:
            del self._inflight[block_id]
            done.set()
        self._ram[block_id] = plain
        while len(self._ram) > RAM_BLOCKS:
            self._ram.popitem(last=False)
        return plain

    def is_wanted(self, ref: BlockRef) -> bool:
        """Whether a read-ahead of REF would do anything."""
        return ref.id_hex not in self._ram and ref.id_hex not in self._inflight

    def forget(self, block_ids: list[str]) -> None:
        for block_id in block_ids:
            self._ram.pop(block_id, None)

    async def fetch_cipher(self, node_id: str, version: int, block_id: str) -> bytes:
        """The block's ciphertext from the appliance, checked against its id."""
        url = await self._url(node_id, version, block_id)
        data: bytes = await trio.to_thread.run_sync(self.connection.get_block, url)
        self.fetched_blocks += 1
        return data

    async def _load(self, node_id: str, version: int, ref: BlockRef) -> bytes:
        block_id = ref.id_hex
        cipher = await trio.to_thread.run_sync(partial(self.cache.get, block_id,
                                                       verify=False))
        if cipher is not None:
            try:                  # decrypting checks the id (a bad block: fetched again)
                return await trio.to_thread.run_sync(decrypt_block, ref, cipher)
            except IntegrityError:
                self.cache.drop(block_id)
        fetched = await self.fetch_cipher(node_id, version, block_id)
        plain = await trio.to_thread.run_sync(decrypt_block, ref, fetched)   # checks the id

        def keep() -> None:
            try:
                self.cache.put(block_id, fetched, checked=True)
            except CacheFullError as exc:
                log.debug("block %s… not cached: %s", block_id[:16], exc.message)

        await trio.to_thread.run_sync(keep)
        return plain

    async def _url(self, node_id: str, version: int, block_id: str) -> str:
        known = self._urls.get(node_id)
        if known is None or known.version != version or block_id not in known.by_block \
                or known.expires_at - URL_MARGIN_S < time.time():
            known = await self._fresh_urls(node_id)
        url = known.by_block.get(block_id)
        if url is None:
            raise IntegrityError(f"the appliance does not list block {block_id[:16]}… for "
                                 "this file (changed on another device meanwhile?)")
        return url

    async def _fresh_urls(self, node_id: str) -> _Urls:
        with trio.move_on_after(FETCH_TIMEOUT_S):
            detail = await self.api.node(node_id)
            urls = _Urls(detail.node.version,
                         float(detail.urls_expire_at or time.time() + 300),
                         {entry.block_id: entry.url for entry in detail.blocks}
                         if detail.method == "GET" else {})
            self._urls[node_id] = urls
            return urls
        raise TransportError(f"the appliance did not answer within {FETCH_TIMEOUT_S:.0f} s")
