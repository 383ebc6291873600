"""The appliance's API as typed calls: one method per route the agent uses, each taking and
returning the protocol's models (protocol.models), so no request body is built by hand and
no answer is read by string keys.

`Api` sits on a `Connection` (agent.client), which carries the requests: retries, the
version check on the first answer, rediscovery, and errors mapped by their wire code. Bodies
are sent with only the fields that were set (`exclude_unset`): for some routes a field's
presence is the request (`parent` in an update is a move).

Listings come in pages; `children`, `changes` and `change_pages` page through them (one
pager, `_pages`), so callers iterate over nodes, changes or whole pages of the feed and never
see an `after` id or ask for the next page themselves.

A batch takes the same node bodies as the single routes: `create_op` and `update_op` turn a
NodeCreate or NodeUpdate into one of its operations.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from pydantic import BaseModel

from agent.client import RETRY_ONCE_CODES, UNRECOVERABLE_RETRY_S, Connection
from protocol import version
from protocol.errors import ErrorCode, ErrorInfo
from protocol.ids import b64decode, b64encode
from protocol.limits import MAX_BLOCKS_PER_NODE, MAX_CHANGES_PAGE, MAX_CHILDREN_PAGE, MAX_TRASH_PAGE
from protocol.models import (
    AdmitRequest,
    AdmitResult,
    BatchCreate,
    BatchDelete,
    BatchRequest,
    BatchResponse,
    BatchUpdate,
    BlockBatch,
    BlockBatchResult,
    BlockData,
    BlockRead,
    BlockReadRequest,
    BlockReadResult,
    BlockStored,
    ChangeOut,
    ChangesPage,
    DeviceCertificate,
    DeviceCertificateRequest,
    GrantIn,
    Grants,
    Health,
    KeyBundle,
    KeyBundleUpdate,
    Me,
    NodeCreate,
    NodeDetail,
    NodeList,
    NodeOut,
    NodeUpdate,
    NodeWrite,
    PublicKey,
    RevocationList,
    SharedItem,
    SharedWithMe,
    ShareRequest,
    VersionBody,
)

M = TypeVar("M", bound=BaseModel)
Operation = BatchCreate | BatchUpdate | BatchDelete
FEED_PAGE = 2000
assert FEED_PAGE <= MAX_CHANGES_PAGE


def wire_body(model: BaseModel) -> bytes:
    """A request model as the JSON that goes on the wire, with only the fields that were
    set (pydantic's own encoder: a batch of 500 files is megabytes of JSON)."""
    return model.model_dump_json(exclude_unset=True).encode()


def body_of(model: BaseModel) -> dict[str, Any]:
    """What `wire_body` sends, decoded."""
    body: dict[str, Any] = json.loads(wire_body(model))
    return body


def create_op(create: NodeCreate) -> BatchCreate:
    """CREATE as an operation of a batch, with the same fields set."""
    return BatchCreate(op="create", **_fields_set(create))


def update_op(node_id: str, update: NodeUpdate) -> BatchUpdate:
    """UPDATE of NODE_ID as an operation of a batch, with the same fields set (a `parent`
    that was set is still a move)."""
    return BatchUpdate(op="update", node_id=node_id, **_fields_set(update))


def item_error(error: ErrorInfo | None) -> str:
    """Why one item of a batch (an operation, a block) failed: its error's message."""
    return "refused without a reason" if error is None else error.message


def _fields_set(model: BaseModel) -> dict[str, Any]:
    return {name: getattr(model, name) for name in model.model_fields_set}


class Api:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def _get(self, answer: type[M], path: str, **params: Any) -> M:
        return answer.model_validate_json(await self.connection.exchange(
            "GET", path, params=params or None))

    async def _send(self, answer: type[M], method: str, path: str,
                    body: BaseModel | None = None, **params: Any) -> M:
        """BODY encoded and the answer decoded by pydantic's own JSON code (a batch of 500
        files is megabytes of JSON each way; going through dicts and the json module cost
        the agent a tenth of its time per small file)."""
        content = None if body is None else wire_body(body)
        return answer.model_validate_json(await self.connection.exchange(
            method, path, content=content, params=params or None))

    # --- the appliance and the account ------------------------------------------------

    async def health(self) -> Health:
        return await self._get(Health, "/health")

    async def me(self) -> Me:
        return await self._get(Me, "/me")

    async def key_bundle(self) -> KeyBundle:
        return await self._get(KeyBundle, "/me/key-bundle")

    async def put_key_bundle(self, public_key: bytes, bundle: bytes, base_version: int
                             ) -> KeyBundle:
        update = KeyBundleUpdate(public_key=b64encode(public_key), bundle=b64encode(bundle),
                                 base_version=base_version)
        return await self._send(KeyBundle, "PUT", "/me/key-bundle", update)

    async def public_key(self, user: str) -> bytes:
        return b64decode((await self._get(PublicKey, f"/users/{user}/public-key")).public_key)

    # --- nodes ----------------------------------------------------------------------------

    async def root(self) -> NodeOut:
        return await self._get(NodeOut, "/root")

    async def node(self, node_id: str) -> NodeDetail:
        """The node, with download URLs for its blocks (or upload URLs while uploading)."""
        return await self._get(NodeDetail, f"/files/{node_id}")

    async def stored_urls(self, node_id: str) -> NodeDetail:
        """API 1.2 (see `supports`): the node with download URLs for the blocks stored so
        far — of a file still uploading, those that are in; of an uploaded one, all."""
        return await self._get(NodeDetail, f"/files/{node_id}/presigned-url",
                               stored_only="true", limit=MAX_BLOCKS_PER_NODE)

    async def create(self, create: NodeCreate) -> NodeWrite:
        return await self._send(NodeWrite, "POST", "/files", create)

    async def update(self, node_id: str, update: NodeUpdate) -> NodeWrite:
        return await self._send(NodeWrite, "PUT", f"/files/{node_id}", update)

    async def delete(self, node_id: str, base_version: int,
                     unchanged_since: int | None = None) -> NodeOut:
        """UNCHANGED_SINCE (a folder; API 1.1, ignored before): the feed cursor the delete
        was decided at: the appliance refuses it (ConflictError) if anything under the
        folder changed after."""
        params = {"base_version": base_version}
        if unchanged_since is not None:
            params["unchanged_since"] = unchanged_since
        return await self._send(NodeOut, "DELETE", f"/files/{node_id}", None, **params)

    async def restore(self, node_id: str, base_version: int) -> NodeOut:
        return await self._send(NodeOut, "POST", f"/files/{node_id}/restore",
                                VersionBody(base_version=base_version))

    def supports(self, since: str) -> bool:
        """Whether the appliance has what came in API version SINCE (known once it has
        answered once)."""
        theirs = self.connection.api_version
        return theirs is not None and version.supports(theirs, since)

    async def batch(self, operations: Sequence[Operation],
                    blocks: Sequence[tuple[str, bytes]] = ()) -> BatchResponse:
        """Operations applied in order in one transaction; each succeeds or fails alone
        (`results`). BLOCKS (id, ciphertext; API 1.1, see `supports`): small blocks the
        operations list, stored first, so their files are uploaded at once. API 1.1 also
        says where the caller's feed stood before and after (`feed`)."""
        request = BatchRequest(operations=list(operations))
        if blocks:
            request = BatchRequest(operations=list(operations), blocks=[
                BlockData(id=block_id, data=b64encode(data)) for block_id, data in blocks])
        return await self._send(BatchResponse, "POST", "/batch/files", request)

    def children(self, folder_id: str, *, include_deleted: bool = False
                 ) -> AsyncIterator[NodeOut]:
        """The folder's entries, a page at a time."""
        params: dict[str, Any] = {"limit": MAX_CHILDREN_PAGE}
        if include_deleted:
            params["include_deleted"] = "true"

        async def page(after: str | None) -> tuple[list[NodeOut], str | None]:
            listing = await self._get(NodeList, f"/files/{folder_id}/children",
                                      after=after or "", **params)
            return listing.nodes, listing.next_after

        return _pages(page, None)

    async def trash(self) -> list[NodeOut]:
        """The newest deleted items of the caller's tree (at most MAX_TRASH_PAGE)."""
        return (await self._get(NodeList, "/trash", limit=MAX_TRASH_PAGE)).nodes

    # --- the changes feed -----------------------------------------------------------------

    async def changes_page(self, cursor: int, limit: int = FEED_PAGE) -> ChangesPage:
        return await self._get(ChangesPage, "/changes", cursor=cursor, limit=limit)

    def change_pages(self, cursor: int) -> AsyncIterator[ChangesPage]:
        """The feed after CURSOR, a page at a time, up to the newest change; each page's
        `cursor` is where the feed stands once it is applied (a caller that records
        its place page by page resumes there)."""
        async def page(after: int | None) -> tuple[list[ChangesPage], int | None]:
            answer = await self.changes_page(cursor if after is None else after)
            return [answer], answer.cursor if answer.has_more else None

        return _pages(page, None)

    async def changes(self, cursor: int) -> AsyncIterator[ChangeOut]:
        """Every change after CURSOR, oldest first (each carries its own cursor)."""
        async for page in self.change_pages(cursor):
            for change in page.changes:
                yield change

    # --- blocks (small ones inline; big ones go through pre-signed URLs) -----------------

    async def put_blocks(self, blocks: Sequence[tuple[str, bytes]]) -> list[BlockStored]:
        batch = BlockBatch(blocks=[BlockData(id=block_id, data=b64encode(data))
                                   for block_id, data in blocks])
        return (await self._send(BlockBatchResult, "POST", "/blocks", batch)).results

    async def read_blocks(self, block_ids: Sequence[str]) -> list[BlockRead]:
        """BLOCK_IDS' ciphertexts, each with its data or its error. Blocks the appliance
        calls unrecoverable are asked for once more after UNRECOVERABLE_RETRY_S, as a
        single block's GET is (agent.client.retry_wait)."""
        request = BlockReadRequest(ids=list(block_ids))
        answers = (await self._send(BlockReadResult, "POST", "/blocks/read", request)).blocks
        again = [entry.id for entry in answers if entry.error is not None
                 and ErrorCode.of(entry.error.code) in RETRY_ONCE_CODES]
        if not again:
            return answers
        await trio.sleep(UNRECOVERABLE_RETRY_S)
        second = (await self._send(BlockReadResult, "POST", "/blocks/read",
                                   BlockReadRequest(ids=again))).blocks
        retried = {entry.id: entry for entry in second}
        return [retried.get(entry.id, entry) for entry in answers]

    # --- sharing --------------------------------------------------------------------------

    async def share(self, node_id: str, grants: Sequence[tuple[str, bytes]]) -> Grants:
        request = ShareRequest(grants=[GrantIn(user=user, wrapped_key=b64encode(wrapped))
                                       for user, wrapped in grants])
        return await self._send(Grants, "POST", f"/files/{node_id}/share", request)

    async def unshare(self, node_id: str, user: str) -> None:
        await self.connection.call("DELETE", f"/files/{node_id}/share/{user}")

    async def shared_with_me(self) -> list[SharedItem]:
        return (await self._get(SharedWithMe, "/shared-with-me")).items

    # --- LAN peers (API 1.5, see `supports(version.PEERS)`; agent/peers) --------------

    async def device_certificate(self, public_key_pem: str) -> DeviceCertificate:
        """A certificate for this device's Ed25519 key (PEM), signed by the device CA."""
        return await self._send(DeviceCertificate, "POST", "/devices/me/certificate",
                                DeviceCertificateRequest(public_key=public_key_pem))

    async def revoked_devices(self) -> RevocationList:
        """Every revoked device id of the appliance: peers refuse them."""
        return await self._get(RevocationList, "/devices/revoked")

    async def admit(self, request: AdmitRequest) -> AdmitResult:
        """Admit a new device of this user that asked on the LAN (`cairn join --lan`)."""
        return await self._send(AdmitResult, "POST", "/devices/admit", request)


T = TypeVar("T")
P = TypeVar("P")


async def _pages(fetch: Callable[[P | None], Awaitable[tuple[list[T], P | None]]],
                 start: P | None) -> AsyncIterator[T]:
    """The items of every page: FETCH(position) answers (items, next position or None)."""
    position = start
    while True:
        items, position = await fetch(position)
        for item in items:
            yield item
        if position is None:
            return
