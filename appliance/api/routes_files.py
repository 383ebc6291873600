"""The node tree: create, update (new version, move), delete and restore, read with
pre-signed block URLs, list children and trash, node history, and the batch form."""

from __future__ import annotations

import secrets
import time
from typing import Annotated

import apsw
from fastapi import APIRouter, Query

from appliance.api.context import ApiContext, Caller, CallerDep, ContextDep
from appliance.api.convert import change_out, decode_b64, node_out
from appliance.api.routes_blocks import blocks_held_and_stored, inline_block
from appliance.device_ca import GrantHolder, sign_grants, user_tag
from appliance.errors import BadRequestError, NotFoundError, RequestError
from appliance.meta import journal as journal_queries
from appliance.meta import tree
from appliance.meta.journal import Journal
from appliance.meta.records import BlockRef, Node
from appliance.meta.tree import NodeContent
from protocol.errors import ErrorInfo
from protocol.limits import (
    MAX_BLOCKS_PER_NODE,
    MAX_CHILDREN_PAGE,
    MAX_HISTORY_PAGE,
    MAX_SQL_INT,
    MAX_TRASH_PAGE,
)
from protocol.models import (
    BatchCreate,
    BatchDelete,
    BatchRequest,
    BatchResponse,
    BatchResult,
    BlockIn,
    FeedSpan,
    NodeCreate,
    NodeDetail,
    NodeHistory,
    NodeList,
    NodeOut,
    NodeUpdate,
    NodeWrite,
    VersionBody,
)

router = APIRouter(tags=["files"])


def _blocks(blocks: list[BlockIn] | None) -> tuple[BlockRef, ...] | None:
    return None if blocks is None else tuple(BlockRef(b.id, b.size) for b in blocks)


def _written(context: ApiContext, caller: Caller, node: Node,
             missing: list[BlockRef]) -> NodeWrite:
    upload = [context.sign("PUT", block, caller.device.id) for block in missing]
    return NodeWrite(node=node_out(node), upload=upload,
                     urls_expire_at=context.urls_expire_at() if upload else None)


def _missing(db: apsw.Connection, node: Node) -> list[BlockRef]:
    return tree.missing_blocks(db, node.id) if node.status == "uploading" else []


def _create(db: apsw.Connection, journal: Journal, caller: Caller,
            body: NodeCreate) -> tuple[Node, list[BlockRef]]:
    content = NodeContent(metadata=decode_b64(body.metadata, "metadata"),
                          wrapped_key=decode_b64(body.wrapped_key, "wrapped_key"),
                          size=body.size, blocks=_blocks(body.blocks))
    node, _ = tree.create_node(db, caller.user, journal, kind=body.kind,
                               parent_id=body.parent, content=content,
                               node_id=body.id or secrets.token_hex(16))
    return node, _missing(db, node)


def _update(db: apsw.Connection, journal: Journal, caller: Caller, node_id: str,
            body: NodeUpdate) -> tuple[Node, list[BlockRef]]:
    if body.blocks is not None and body.size is None:
        raise RequestError("size is required when blocks are given")
    content = NodeContent(metadata=decode_b64(body.metadata, "metadata"),
                          wrapped_key=decode_b64(body.wrapped_key, "wrapped_key"),
                          size=-1 if body.size is None else body.size,
                          blocks=_blocks(body.blocks))
    node = tree.update_node(db, caller.user, journal, tree.check_node_id(node_id),
                            base_version=body.base_version, parent_id=body.parent,
                            content=content, move="parent" in body.model_fields_set)
    return node, _missing(db, node)


@router.post("/files", response_model=NodeWrite, status_code=201)
async def create_node(body: NodeCreate, caller: CallerDep, context: ContextDep) -> NodeWrite:
    """Create a file or folder. Answers upload URLs for the blocks the appliance does not
    hold (held ones are deduplicated). The node is `uploading` until its last block
    arrives, then `uploaded`. Sending the same create again (same `id` and content) answers
    the URLs of the blocks still missing: that is how an interrupted upload resumes."""
    node, missing = await context.change(
        caller.device.id, lambda db, journal: _create(db, journal, caller, body))
    return _written(context, caller, node, missing)


@router.put("/files/{node_id}", response_model=NodeWrite)
async def update_node(node_id: str, body: NodeUpdate, caller: CallerDep,
                      context: ContextDep) -> NodeWrite:
    """A new version: new metadata and, optionally, a new block list; with `parent`, a
    move (the node key re-wrapped for the new parent). `base_version` must be the current
    version, else 409 with `current_version`: nothing is overwritten silently."""
    node, missing = await context.change(
        caller.device.id, lambda db, journal: _update(db, journal, caller, node_id, body))
    return _written(context, caller, node, missing)


@router.delete("/files/{node_id}", response_model=NodeOut)
async def delete_node(node_id: str, base_version: Annotated[int, Query(ge=1)],
                      caller: CallerDep, context: ContextDep,
                      unchanged_since: Annotated[int | None, Query(
                          ge=0, le=MAX_SQL_INT, description="API 1.1, for a folder: the "
                          "feed cursor the delete was decided at; 409 if anything under "
                          "the folder changed after it")] = None) -> NodeOut:
    """Tombstone the node (a folder with everything under it). Its data is kept for the
    grace period (7 days by default): POST /files/{id}/restore brings it back."""
    node = await context.change(caller.device.id, lambda db, journal: tree.delete_node(
        db, caller.user, journal, tree.check_node_id(node_id), base_version,
        unchanged_since))
    return node_out(node)


@router.post("/files/{node_id}/restore", response_model=NodeOut)
async def restore_node(node_id: str, body: VersionBody, caller: CallerDep,
                       context: ContextDep) -> NodeOut:
    """Undo a delete within the grace period (410 once the data is reclaimed)."""
    node = await context.change(caller.device.id, lambda db, journal: tree.restore_node(
        db, caller.user, journal, tree.check_node_id(node_id), body.base_version))
    return node_out(node)


def _detail(db: apsw.Connection, context: ApiContext, caller: Caller, node_id: str,
            offset: int, limit: int, stored_only: bool = False) -> NodeDetail:
    node = tree.readable_node(db, caller.user.id, node_id)
    if node.deleted or node.kind == "dir":
        return NodeDetail(node=node_out(node), method=None, blocks=[], urls_expire_at=None)
    if node.status == "uploaded" or stored_only:
        blocks = tree.node_blocks(db, node.id, offset, limit) if node.status == "uploaded" \
            else tree.stored_blocks(db, node.id, offset, limit)
        urls = [context.sign("GET", block, caller.device.id) for block in blocks]
        return NodeDetail(node=node_out(node), method="GET", blocks=urls,
                          urls_expire_at=context.urls_expire_at() if urls else None,
                          peer_grants=_peer_grants(context, caller, blocks))
    if node.owner_id != caller.user.id:
        return NodeDetail(node=node_out(node), method=None, blocks=[], urls_expire_at=None)
    missing = tree.missing_blocks(db, node.id)[offset:offset + limit]
    urls = [context.sign("PUT", block, caller.device.id) for block in missing]
    return NodeDetail(node=node_out(node), method="PUT", blocks=urls,
                      urls_expire_at=context.urls_expire_at() if urls else None)


def _peer_grants(context: ApiContext, caller: Caller, blocks: list[BlockRef]) -> list[str]:
    """API 1.5: grants for the caller's certificate key to read BLOCKS from its user's
    peers, after the read check `_detail` made. Empty without a key on record (the device
    has no certificate yet). A reader of a shared node gets them too: it is the peer that
    decides, and it serves its own user's devices only."""
    key = caller.device.cert_key_sha256
    if key is None or context.device_ca is None or not blocks:
        return []
    holder = GrantHolder(caller.device.id, key, user_tag(context.device_ca, caller.user.id))
    return sign_grants(context.device_ca, context.appliance_id, holder,
                       (block.block_id for block in blocks), time.time())


async def _read_detail(context: ApiContext, caller: Caller, node_id: str, offset: int,
                       limit: int, stored_only: bool = False) -> NodeDetail:
    detail = await context.meta.read(lambda db: _detail(
        db, context, caller, node_id, offset, limit, stored_only))
    context.counters.grants_issued += len(detail.peer_grants)
    return detail


@router.get("/files/{node_id}", response_model=NodeDetail)
async def get_node(node_id: str, caller: CallerDep, context: ContextDep) -> NodeDetail:
    """The node and pre-signed URLs: for an uploaded file, a download URL per block in
    order; for the owner of a file still uploading, upload URLs for its missing blocks.
    With download URLs, API 1.5 adds `peer_grants` for the caller's device certificate."""
    return await _read_detail(context, caller, node_id, 0, MAX_BLOCKS_PER_NODE)


@router.get("/files/{node_id}/presigned-url", response_model=NodeDetail)
async def presigned_urls(node_id: str, caller: CallerDep, context: ContextDep,
                         offset: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
                         limit: Annotated[int, Query(ge=1, le=MAX_BLOCKS_PER_NODE)] = 1000,
                         stored_only: Annotated[bool, Query(description=(
                             "API 1.2: for a file still uploading, download URLs of the "
                             "blocks stored so far (each once, in order of first use; "
                             "`offset` counts those), so another device can fetch it while "
                             "it is uploaded"))] = False,
                         ) -> NodeDetail:
    """Fresh pre-signed URLs for a window of the node's blocks (the seed's route); use it
    to refresh expired URLs during a long transfer. With download URLs, API 1.5 adds
    `peer_grants` for the caller's device certificate, covering the window's blocks."""
    return await _read_detail(context, caller, node_id, offset, limit, stored_only)


@router.get("/files/{node_id}/children", response_model=NodeList)
async def list_children(node_id: str, caller: CallerDep, context: ContextDep,
                        after: str = "",
                        limit: Annotated[int, Query(ge=1, le=MAX_CHILDREN_PAGE)] = 1000,
                        include_deleted: bool = False) -> NodeList:
    """The folder's entries, by id, a page at a time (`after` = the last id seen)."""
    def read(db: apsw.Connection) -> NodeList:
        folder = tree.readable_node(db, caller.user.id, node_id)
        nodes = tree.children(db, folder.id, include_deleted, after, limit)
        return NodeList(nodes=[node_out(n) for n in nodes],
                        next_after=nodes[-1].id if len(nodes) == limit else None)
    return await context.meta.read(read)


@router.get("/files/{node_id}/changes", response_model=NodeHistory)
async def node_changes(node_id: str, caller: CallerDep, context: ContextDep,
                       since_version: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
                       limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 1000,
                       ) -> NodeHistory:
    """The node's history after `since_version`: which version, what kind of change,
    when, and from which device."""
    def read(db: apsw.Connection) -> NodeHistory:
        node = tree.readable_node(db, caller.user.id, node_id)
        changes = journal_queries.node_history(db, node.id, since_version, limit)
        return NodeHistory(node_id=node.id, changes=[change_out(c) for c in changes])
    return await context.meta.read(read)


@router.get("/root", response_model=NodeOut)
async def root(caller: CallerDep, context: ContextDep) -> NodeOut:
    """The caller's root folder (404 until the first device creates it)."""
    node = await context.meta.read(lambda db: tree.root_node(db, caller.user.id))
    if node is None:
        raise NotFoundError(f"user {caller.user.name} has no root folder yet")
    return node_out(node)


@router.get("/trash", response_model=NodeList)
async def trash(caller: CallerDep, context: ContextDep,
                limit: Annotated[int, Query(ge=1, le=MAX_TRASH_PAGE)] = 1000) -> NodeList:
    """Nodes deleted within the grace period (restorable), newest first."""
    nodes = await context.meta.read(lambda db: tree.trash(db, caller.user.id, limit))
    return NodeList(nodes=[node_out(n) for n in nodes], next_after=None)


@router.post("/batch/files", response_model=BatchResponse)
async def batch(body: BatchRequest, caller: CallerDep, context: ContextDep) -> BatchResponse:
    """Many creates, updates and deletes in one request and one transaction; each
    operation succeeds or fails on its own (its error is reported in its result)."""
    def run(db: apsw.Connection, journal: Journal) -> list[BatchResult]:
        results = []
        for operation in body.operations:
            try:
                with db:  # a savepoint: a failed operation leaves no trace
                    if isinstance(operation, BatchCreate):
                        node, missing = _create(db, journal, caller, operation)
                    elif isinstance(operation, BatchDelete):
                        node = tree.delete_node(db, caller.user, journal,
                                                tree.check_node_id(operation.node_id),
                                                operation.base_version)
                        missing = []
                    else:
                        node, missing = _update(db, journal, caller, operation.node_id,
                                                operation)
                results.append(BatchResult(ok=True, result=_written(
                    context, caller, node, missing)))
            except RequestError as exc:
                results.append(BatchResult(ok=False, error=ErrorInfo(
                    code=exc.code, message=exc.message)))
        return results

    inline = _inline_blocks(body)

    def record_then_run(db: apsw.Connection, journal: Journal) -> BatchResponse:
        before = journal_queries.latest_cursor(db, caller.user.id)
        for block_id, data in inline.items():
            tree.mark_block_stored(db, block_id, len(data), journal)
        results = run(db, journal)
        return BatchResponse(results=results, feed=FeedSpan(
            before=before, after=journal_queries.latest_cursor(db, caller.user.id),
            added=journal_queries.added_since(db, caller.user.id, before)))

    async with blocks_held_and_stored(context, inline):
        return await context.change(caller.device.id, record_then_run)


def _inline_blocks(body: BatchRequest) -> dict[str, bytes]:
    """The request's inline blocks by id, each one an operation lists, with that size.
    Raises BadRequestError (the whole request: nothing is stored or changed)."""
    listed = {block.id: block.size for operation in body.operations
              if not isinstance(operation, BatchDelete) and operation.blocks
              for block in operation.blocks}
    inline: dict[str, bytes] = {}
    for item in body.blocks:
        data = inline_block(item)
        if listed.get(item.id) != len(data):
            raise BadRequestError(f"block {item.id[:16]} is not one of the operations' "
                                  "blocks (with this size)")
        inline[item.id] = data
    return inline
