"""Plaintext blocks of remote files, on demand: a small RAM cache of decrypted blocks, then
the on-disk cache of ciphertext blocks (agent.blockcache, verified on read), then the
appliance (pre-signed URLs, cached per node version until they expire).

Every block fetched is checked against its id (BLAKE3 of the ciphertext), decrypted and
checked against its plain hash before a byte of it is used. A block wanted by several
readers at once is fetched once. Reads that the appliance cannot answer fail fast: the
URL request has FETCH_TIMEOUT_S, and the drive's connection for reads retries once.

LAN peers, when the mount runs a peer service (agent/peers/transfer.service_access): the
URLs come with block grants; the peers found are then asked, in the background, which of
the node's blocks they hold (HAVE, once per node version). A block is first asked of a
peer that said it holds it (the peer client's short timeouts: 2 s to connect, 3 s to
read), its id checked at once, else it comes from the appliance. A peer that sends a
wrong block or refuses is not asked again while the drive runs; one that times out or
fails rests for PEER_REST_S.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import trio

from agent.api import Api
from agent.blockcache import BlockCache
from agent.client import Connection
from agent.crypto.blocks import BlockRef, decrypt_block, plain_hash_of
from agent.errors import (
    CacheFullError,
    CairnAgentError,
    IntegrityError,
    PeerFetchError,
    TransportError,
)
from agent.peers.fetch import Failure
from agent.peers.peer_client import PeerClient, index_grants
from agent.peers.transfer import PeerAccess, service_access

log = logging.getLogger("cairn.drive")

RAM_BLOCKS = 8           # decrypted blocks kept in memory (4 MiB each at most)
PREFETCH_BLOCKS = 4      # blocks read ahead of a sequential reader
FETCH_TIMEOUT_S = 1.0    # an unreachable appliance must not hang a read
URL_MARGIN_S = 30        # URLs this close to expiring are asked for again
PEER_REST_S = 30.0       # a peer that timed out or failed is not asked for this long


@dataclass
class _Urls:
    version: int
    expires_at: float
    by_block: dict[str, str]
    grants: dict[str, str] = field(default_factory=dict)     # block id -> its grant
    holders: dict[str, list[PeerClient]] = field(default_factory=dict)


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
        self.peer_blocks = 0              # of fetched_blocks, those from LAN peers
        self._bad_peers: set[str] = set()           # wrong bytes or refused: never again
        self._resting: dict[str, float] = {}        # peer -> when it may be asked again

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
        """The block's ciphertext: from a LAN peer that holds it (checked against its id
        here), else from the appliance (checked when decrypted)."""
        url = await self._url(node_id, version, block_id)
        data = await self._from_peers(self._urls[node_id], block_id)
        if data is None:
            data = await trio.to_thread.run_sync(self.connection.get_block, url)
        else:
            self.peer_blocks += 1
        self.fetched_blocks += 1
        return data

    async def _from_peers(self, urls: _Urls, block_id: str) -> bytes | None:
        grant = urls.grants.get(block_id)
        if grant is None:
            return None
        for client in list(urls.holders.get(block_id, ())):
            name = client.name
            if name in self._bad_peers or self._resting.get(name, 0.0) > time.monotonic():
                continue
            try:
                data = bytes(await trio.to_thread.run_sync(client.block, block_id, grant))
            except PeerFetchError as exc:
                self._peer_failed(urls, block_id, client, Failure(exc.failure),
                                  exc.message)
                continue
            if hmac.compare_digest(plain_hash_of(data), bytes.fromhex(block_id)):
                return data
            self._peer_failed(urls, block_id, client, Failure.WRONG_BYTES,
                              "not the block its id names")
        return None

    def _peer_failed(self, urls: _Urls, block_id: str, client: PeerClient,
                     failure: Failure, message: str) -> None:
        name = client.name
        if failure is Failure.NOT_HELD:
            urls.holders[block_id] = [c for c in urls.holders[block_id] if c is not client]
        elif failure in (Failure.WRONG_BYTES, Failure.REFUSED):
            if name not in self._bad_peers:
                log.warning("peer %s %s for block %s… (%s): not asked again", name,
                            "sent wrong bytes" if failure is Failure.WRONG_BYTES
                            else "refused", block_id[:16], message)
            self._bad_peers.add(name)
        else:
            log.info("peer %s rests %.0f s (%s): %s", name, PEER_REST_S, failure.value,
                     message)
            self._resting[name] = time.monotonic() + PEER_REST_S

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
            known = self._urls.get(node_id)
            if known is not None and known.version == urls.version:
                urls.holders = known.holders          # the same blocks: what peers said
            self._urls[node_id] = urls
            access = service_access()
            if access is not None and detail.peer_grants and urls.by_block:
                self._ask_peers(access, urls, detail.peer_grants)
            return urls
        raise TransportError(f"the appliance did not answer within {FETCH_TIMEOUT_S:.0f} s")

    def _ask_peers(self, access: PeerAccess, urls: _Urls, grants: list[str]) -> None:
        """Index URLS' grants and, unless asked already for this version, ask the peers
        found which blocks they hold — in the background: no read waits on a peer."""
        identity = access.identity()
        if identity is None:
            return
        urls.grants = index_grants(grants, identity, time.time())[0]   # renewed with
                                                                       # the URLs
        if urls.holders:
            return
        wanted = [block for block in urls.by_block if block in urls.grants]

        async def ask_all() -> None:
            try:
                clients = await access.clients()
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(ask, client)
            except Exception as exc:     # never a reason for a read to fail
                log.debug("peers not asked: %s", exc)

        async def ask(client: PeerClient) -> None:
            try:
                held = await trio.to_thread.run_sync(client.have, wanted, urls.grants,
                                                     abandon_on_cancel=True)
            except CairnAgentError as exc:
                log.debug("peer not used: %s", exc.message)
                return
            for block in held:
                urls.holders.setdefault(block, []).append(client)

        if wanted:
            trio.lowlevel.spawn_system_task(ask_all)
