"""The data plane: PUT and GET of single blocks on pre-signed URLs, and the batch upload
of small blocks with a device token.

A stored block is durable in the block store before the database says so; the node that
was waiting for its last block becomes `uploaded` in the same transaction that records the
block, and the change is published. A crash in between leaves the block to be sent again
(the upload is idempotent), never a node `uploaded` with a block missing.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import apsw
import blake3
import trio
from fastapi import APIRouter, Request, Response
from starlette.types import Receive, Scope, Send

from appliance.api.context import ApiContext, CallerDep, ContextDep, context_of
from appliance.api.convert import decode_b64
from appliance.errors import (
    BadRequestError,
    BlockIdMismatchError,
    CairnApplianceError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
)
from appliance.meta import accounts, tree
from appliance.meta.journal import Journal
from appliance.meta.records import Device
from appliance.presign import BLOCK_PATH_PREFIX, UrlRefused, verify_block_url
from protocol.errors import ErrorCode, ErrorInfo
from protocol.ids import b64encode
from protocol.limits import MAX_BATCH_READ_BYTES, MAX_BLOCK_BYTES, MAX_INLINE_BLOCK_BYTES
from protocol.models import (
    BlockBatch,
    BlockBatchResult,
    BlockData,
    BlockRead,
    BlockReadRequest,
    BlockReadResult,
    BlockStored,
)

router = APIRouter(tags=["blocks"])
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
RESPONSE_SLICE = 1024 * 1024


class BlockResponse(Response):
    """A block sent RESPONSE_SLICE bytes per ASGI message, with its Content-Length.

    Starlette sends a body in one message, and h11 then joins it into a new bytes object
    with its framing: one more 4 MiB copy per download in flight, in memory until sent.
    In slices, each copy is one slice."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        body = bytes(self.body)
        for start in range(0, max(len(body), 1), RESPONSE_SLICE):
            await send({"type": "http.response.body",
                        "body": body[start:start + RESPONSE_SLICE],
                        "more_body": start + RESPONSE_SLICE < len(body)})


class RangeNotSatisfiable(RequestError):
    code = ErrorCode.RANGE_NOT_SATISFIABLE
    http_status = 416


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single `bytes=` range; None for the whole block.
    Raises RangeNotSatisfiable for a range outside the block or a malformed one."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise RangeNotSatisfiable(f"unsupported Range {header[:60]!r}: use one "
                                  "bytes=START-END range")
    first, last = match.group(1), match.group(2)
    if first == "":
        start, end = max(0, length - int(last)), length
    else:
        start = int(first)
        end = length if last == "" else min(length, int(last) + 1)
    if start >= length or start >= end:
        raise RangeNotSatisfiable(f"range {header[:60]!r} is outside the block "
                                  f"({length} bytes)")
    return start, end


async def _check_url(request: Request, context: ApiContext, method: str, block_id: str,
                     exp: str | None, dev: str | None, sig: str | None) -> Device:
    try:
        verify_block_url(context.url_key, method, BLOCK_PATH_PREFIX + block_id, exp, dev,
                         sig, time.time())
    except UrlRefused as exc:
        raise ForbiddenError(f"refused: {exc.reason}") from None
    assert dev is not None
    try:
        device = await context.meta.read(lambda db: accounts.device_by_id(db, dev))
    except NotFoundError:
        raise ForbiddenError("refused: the URL's device does not exist") from None
    if device.revoked_at is not None:
        raise ForbiddenError("refused: the URL's device has been revoked")
    context.device_limits.check(device.id, time.monotonic())
    return device


async def _store_or_verify(context: ApiContext, block_id: str, data: bytes,
                           stored: bool) -> None:
    """Put the block in the store (which checks its id), or, if it is stored already, only
    check that these bytes are that block. Raises BlockIdMismatchError."""
    if not stored:
        await context.store.put(block_id, data)
        return
    digest = await trio.to_thread.run_sync(lambda: blake3.blake3(data).hexdigest())
    if digest != block_id:
        raise BlockIdMismatchError("the block's bytes do not hash to its id")


def inline_block(item: BlockData) -> bytes:
    """The bytes of a block sent inline (POST /blocks, POST /batch/files). Raises
    BadRequestError for bad base64 or a size outside 1..MAX_INLINE_BLOCK_BYTES."""
    data = decode_b64(item.data, f"block {item.id[:16]}")
    if not 0 < len(data) <= MAX_INLINE_BLOCK_BYTES:
        raise BadRequestError(f"inline blocks have 1 to {MAX_INLINE_BLOCK_BYTES} bytes; "
                              "send bigger ones to their URL")
    return data


async def _store_all(context: ApiContext, blocks: dict[str, bytes],
                     stored: dict[str, bool]) -> dict[str, CairnApplianceError]:
    """Store every block of BLOCKS that STORED says is not there yet (all of them in one
    worker thread, their commits shared: BlockStore.put_many) and check that the others'
    bytes are those blocks; the ones that failed, with why."""
    failed: dict[str, CairnApplianceError] = {}
    if not blocks:
        return failed
    new = {block_id: data for block_id, data in blocks.items() if not stored[block_id]}

    def verify_stored() -> None:
        for block_id, data in blocks.items():
            if stored[block_id] and blake3.blake3(data).hexdigest() != block_id:
                failed[block_id] = BlockIdMismatchError("the block's bytes do not hash "
                                                        "to its id")

    if len(new) < len(blocks):
        await trio.to_thread.run_sync(verify_stored)
    if new:
        results = await context.store.put_many(new)
        failed.update({block_id: result for block_id, result in results.items()
                       if isinstance(result, CairnApplianceError)})
    return failed


@asynccontextmanager
async def blocks_held_and_stored(context: ApiContext,
                                 blocks: dict[str, bytes]) -> AsyncIterator[None]:
    """Store BLOCKS (id -> bytes, each id checked against its bytes) and hold their locks
    until the caller has recorded them (`tree.mark_block_stored`, in its own transaction),
    so GC cannot take one in between. Raises the first failed block's error."""
    async with context.block_locks.hold_all(blocks):
        stored = await context.meta.read(
            lambda db: {block_id: tree.block_is_stored(db, block_id) for block_id in blocks})
        failed = await _store_all(context, blocks, stored)
        for block_id in blocks:
            if block_id in failed:
                raise failed[block_id]
        yield


async def store_block(context: ApiContext, device_id: str, block_id: str,
                      data: bytes) -> list[str]:
    """Store a block (verifying its BLAKE3 id) and record it; returns the nodes it
    completed. Idempotent: a block already stored is only verified."""
    tree.check_block_id(block_id)
    async with context.block_locks.hold(block_id):
        stored = await context.meta.read(lambda db: tree.block_is_stored(db, block_id))
        async with context.block_transfers:
            await _store_or_verify(context, block_id, data, stored)
        completed = await context.change(device_id, lambda db, journal: tree.mark_block_stored(
            db, block_id, len(data), journal))
    return [node.id for node in completed]


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, joined once at the end: growing a bytearray and then copying it
    to bytes went over a 4 MiB block ~3 times (CPU on the event loop, page faults)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"a block has at most {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"a block has at most {limit} bytes")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@router.put("/blocks/{block_id}", response_model=BlockStored,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}})
async def put_block(block_id: str, request: Request,
                    exp: str | None = None, dev: str | None = None,
                    sig: str | None = None) -> BlockStored:
    """Upload one block to a pre-signed URL (from POST/PUT /files). The body is the
    block's ciphertext; its BLAKE3 must be the id. Safe to repeat."""
    context = context_of(request)
    device = await _check_url(request, context, "PUT", block_id, exp, dev, sig)
    data = await _read_body(request, MAX_BLOCK_BYTES)
    if not data:
        raise BadRequestError("a block cannot be empty")
    completed = await store_block(context, device.id, block_id, data)
    return BlockStored(block_id=block_id, ok=True, completed_nodes=completed)


@router.get("/blocks/{block_id}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}},
                       206: {"content": {"application/octet-stream": {}},
                             "description": "partial content (Range)"}})
async def get_block(block_id: str, request: Request, exp: str | None = None,
                    dev: str | None = None, sig: str | None = None) -> Response:
    """Download one block from a pre-signed URL; supports a single `Range`. The URL's
    device must still be able to read a node holding the block: an unshare or a purge
    takes effect at once, not when the URL expires."""
    context = context_of(request)
    device = await _check_url(request, context, "GET", block_id, exp, dev, sig)
    if not await context.meta.read(
            lambda db: tree.user_may_read_block(db, device.user_id, block_id)):
        raise NotFoundError(f"no block {block_id[:16]}… that you can read")
    async with context.block_transfers:
        data = await context.store.get(tree.check_block_id(block_id))
    span = parse_range(request.headers.get("range"), len(data))
    context.counters.served_block(len(data) if span is None else span[1] - span[0])
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, "
               "immutable", "ETag": f'"{block_id}"'}
    if span is None:
        return BlockResponse(data, media_type="application/octet-stream", headers=headers)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
    return BlockResponse(data[start:end], status_code=206, media_type="application/octet-stream",
                    headers=headers)


@router.post("/blocks", response_model=BlockBatchResult)
async def put_blocks(body: BlockBatch, caller: CallerDep,
                     context: ContextDep) -> BlockBatchResult:
    """Upload many small blocks (each up to 64 KiB) in one request, with the device
    token instead of URLs. Each must be awaited by one of the caller's uploading nodes
    (or already stored); each succeeds or fails on its own. The blocks are written
    concurrently and recorded in one transaction."""
    errors: dict[str, ErrorInfo] = {}
    blocks: dict[str, bytes] = {}
    for item in body.blocks:
        try:
            blocks[item.id] = inline_block(item)
        except RequestError as exc:
            errors[item.id] = ErrorInfo(code=exc.code, message=exc.message)

    def triage(db: apsw.Connection) -> dict[str, bool]:
        """block id -> already stored, for the blocks the caller may send."""
        allowed = {}
        for block_id in blocks:
            stored = tree.block_is_stored(db, block_id)
            if stored or tree.user_awaits_block(db, caller.user.id, block_id):
                allowed[block_id] = stored
            else:
                errors[block_id] = ErrorInfo(code=ErrorCode.FORBIDDEN, message="no node of yours "
                                             "is waiting for this block")
        return allowed

    completed: dict[str, list[str]] = {}
    async with context.block_locks.hold_all(blocks):
        allowed = await context.meta.read(triage)
        failed = await _store_all(context, {b: blocks[b] for b in allowed}, allowed)
        errors.update({block_id: ErrorInfo(code=exc.code, message=exc.message)
                       for block_id, exc in failed.items()})
        done = [block_id for block_id in allowed if block_id not in failed]

        def record(db: apsw.Connection, journal: Journal) -> None:
            for block_id in done:
                nodes = tree.mark_block_stored(db, block_id, len(blocks[block_id]), journal)
                completed[block_id] = [node.id for node in nodes]

        if done:
            await context.change(caller.device.id, record)
    return BlockBatchResult(results=[
        BlockStored(block_id=item.id, ok=item.id in completed,
                    completed_nodes=completed.get(item.id, []), error=errors.get(item.id))
        for item in body.blocks])


@router.post("/blocks/read", response_model=BlockReadResult)
async def read_blocks(body: BlockReadRequest, caller: CallerDep,
                      context: ContextDep) -> BlockReadResult:
    """Download many small blocks (each up to 64 KiB, 16 MiB in all) in one request, with
    the device token instead of URLs: how an agent fetches a thousand small files at once.
    Each block must belong to a node the caller can read; each succeeds or fails alone
    (bigger blocks: fetch them from their URLs)."""
    wanted = list(dict.fromkeys(body.ids))

    def readable(db: apsw.Connection) -> set[str]:
        return {block_id for block_id in wanted if _is_block_id(block_id)
                and tree.user_may_read_block(db, caller.user.id, block_id)}

    allowed = await context.meta.read(readable)
    found: dict[str, bytes] = {}
    errors: dict[str, ErrorInfo] = {}

    def read_all() -> None:
        """Every block in one worker thread, not a hand-off per block; what fails is
        dropped at once (only the answer's 16 MiB are ever held)."""
        budget = MAX_BATCH_READ_BYTES
        for block_id in wanted:
            if block_id not in allowed:
                errors[block_id] = ErrorInfo(code=ErrorCode.NOT_FOUND,
                                             message="no such block that you can read")
                continue
            try:
                data = context.store.store.get(block_id)
            except CairnApplianceError as exc:
                errors[block_id] = ErrorInfo(code=exc.code, message=exc.message)
                continue
            if len(data) > MAX_INLINE_BLOCK_BYTES:
                errors[block_id] = ErrorInfo(code=ErrorCode.BAD_REQUEST, message="over "
                                             "64 KiB: fetch it from its URL")
            elif len(data) > budget:
                errors[block_id] = ErrorInfo(code=ErrorCode.PAYLOAD_TOO_LARGE, message="over "
                                             "the batch's 16 MiB: ask again")
            else:
                budget -= len(data)
                found[block_id] = data

    await context.store.run_sync(read_all)
    context.counters.served_batch([len(data) for data in found.values()])
    return BlockReadResult(blocks=[
        BlockRead(id=block_id, data=b64encode(found[block_id]))
        if block_id in found else BlockRead(id=block_id, error=errors[block_id])
        for block_id in wanted])


def _is_block_id(block_id: str) -> bool:
    try:
        tree.check_block_id(block_id)
    except RequestError:
        return False
    return True
