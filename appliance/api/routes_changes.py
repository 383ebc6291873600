"""The changes feed (pull, by cursor) and the event stream (push of new cursors)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import apsw
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from appliance.api.context import CallerDep, ContextDep
from appliance.api.convert import change_out
from appliance.meta import epoch, journal, tree
from appliance.meta.records import Node
from protocol.limits import MAX_CHANGES_PAGE, MAX_SQL_INT
from protocol.models import (
    ChangesPage,
)

router = APIRouter(tags=["changes"])


@router.get("/changes", response_model=ChangesPage)
async def changes(caller: CallerDep, context: ContextDep,
                  cursor: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_CHANGES_PAGE)] = 1000) -> ChangesPage:
    """Every change after `cursor` to nodes the caller can see (their tree and what is
    shared with them), oldest first, each with the node as it is now. Read by index: the
    cost follows the number of changes returned, not the size of the tree. The page names
    the epoch its cursors belong to, read in the same snapshot, so a pulling device
    notices a recovery from an older copy without asking anything else."""
    user_id = caller.user.id

    def read(db: apsw.Connection) -> ChangesPage:
        page = journal.feed_page(db, user_id, cursor, limit + 1)
        visible: dict[str, Node | None] = {}
        entries = []
        for change in page[:limit]:
            if change.node_id not in visible:
                node = tree.find_node(db, change.node_id)
                visible[change.node_id] = node if node is not None and tree.can_read(
                    db, user_id, node) else None
            entries.append(change_out(change, visible[change.node_id]))
        return ChangesPage(changes=entries,
                           cursor=entries[-1].cursor if entries else cursor,
                           has_more=len(page) > limit, epoch=epoch.current_epoch(db))
    return await context.meta.read(read)


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "server-sent events"}})
async def events(caller: CallerDep, context: ContextDep,
                 cursor: Annotated[int | None, Query(ge=0, le=MAX_SQL_INT)] = None,
                 heartbeat: Annotated[float | None, Query(ge=0.5, le=300)] = None,
                 ) -> StreamingResponse:
    """A server-sent-events stream: `event: cursor` with `{"cursor": N}` whenever changes
    the caller can see are committed (then pull GET /changes), and `event: heartbeat`
    every `heartbeat` seconds (15 by default) so dead connections are noticed. Starts with
    the newest cursor, or with nothing if `cursor` is already the newest. API 1.5: `event:
    revoked` with `{"count": N}` within a few seconds of a device being revoked (then
    re-read GET /devices/revoked)."""
    user_id = caller.user.id
    interval = heartbeat or context.settings.heartbeat_s
    latest = max(await context.meta.read(lambda db: journal.latest_cursor(db, user_id)),
                 context.notifier.latest(user_id))

    notifier = context.notifier
    revoked_seen = notifier.revoked_count

    async def stream() -> AsyncIterator[str]:
        nonlocal revoked_seen
        sent = -1 if cursor is None else cursor
        newest = latest
        yield "retry: 1000\n\n"
        while not notifier.closed:
            if newest > sent:
                yield f"event: cursor\nid: {newest}\ndata: {json.dumps({'cursor': newest})}\n\n"
                sent = newest
            if notifier.revoked_count != revoked_seen:
                revoked_seen = notifier.revoked_count
                yield f"event: revoked\ndata: {json.dumps({'count': revoked_seen})}\n\n"
            news = await notifier.wait_news(user_id, sent, revoked_seen, interval)
            newest = max(newest, notifier.latest(user_id))
            if not news and not notifier.closed:
                yield "event: heartbeat\ndata: {}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
