"""The typed API client (agent/api.py) on a fake connection: what goes on the wire for a
batch operation, and how the pager walks the changes feed and folder listings."""

from __future__ import annotations

import json
from typing import Any, cast

from agent.api import FEED_PAGE, Api, body_of, create_op, item_error, update_op
from agent.client import Connection
from protocol.errors import ErrorInfo
from protocol.limits import MAX_CHILDREN_PAGE
from protocol.models import BlockIn, NodeCreate, NodeUpdate

NODE = "a" * 32
PARENT = "b" * 32
BLOCK = "c" * 64


class FakeConnection:
    """Answers each request from ANSWERS by (method, path, cursor or after) and records it."""

    def __init__(self, answers: dict[tuple[str, str, object], Any]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []

    async def exchange(self, method: str, path: str, *, content: bytes | None = None,
                       params: dict[str, Any] | None = None) -> bytes:
        self.requests.append((method, path, params))
        place = (params or {}).get("cursor", (params or {}).get("after"))
        return json.dumps(self.answers[(method, path, place)]).encode()


def _node(node_id: str) -> dict[str, Any]:
    return {"id": node_id, "owner": "ann", "parent": PARENT, "kind": "file", "version": 1,
            "status": "uploaded", "deleted": False, "deleted_at": None, "size": 0,
            "block_count": 0, "metadata": "", "wrapped_key": "", "created_at": 1.0,
            "updated_at": 1.0, "updated_by": None}


def _change(cursor: int, node_id: str) -> dict[str, Any]:
    return {"cursor": cursor, "node_id": node_id, "version": 1, "kind": "update", "at": 1.0,
            "device_id": None, "node": _node(node_id)}


def test_a_batch_operation_carries_exactly_the_fields_that_were_set() -> None:
    rename = update_op(NODE, NodeUpdate(base_version=3, metadata="bWV0YQ==",
                                        wrapped_key="a2V5"))
    move = update_op(NODE, NodeUpdate(base_version=3, parent=PARENT, metadata="bWV0YQ==",
                                      wrapped_key="a2V5"))
    assert body_of(rename) == {"op": "update", "node_id": NODE, "base_version": 3,
                               "metadata": "bWV0YQ==", "wrapped_key": "a2V5"}
    assert body_of(move)["parent"] == PARENT         # a parent that was set is a move
    folder = create_op(NodeCreate(id=NODE, parent=PARENT, kind="dir", metadata="bWV0YQ==",
                                  wrapped_key="a2V5"))
    assert body_of(folder) == {"op": "create", "id": NODE, "parent": PARENT, "kind": "dir",
                               "metadata": "bWV0YQ==", "wrapped_key": "a2V5"}
    file = create_op(NodeCreate(id=NODE, parent=PARENT, kind="file", metadata="bWV0YQ==",
                                wrapped_key="a2V5", size=5, blocks=[BlockIn(id=BLOCK, size=21)]))
    assert body_of(file)["blocks"] == [{"id": BLOCK, "size": 21}]
    assert body_of(file)["size"] == 5


def test_an_item_error_names_its_message() -> None:
    assert item_error(ErrorInfo(code="conflict", message="version 4 is current")) \
        == "version 4 is current"
    assert item_error(None)


async def test_the_feed_is_read_a_page_at_a_time_from_each_pages_cursor() -> None:
    connection = FakeConnection({
        ("GET", "/changes", 10): {"changes": [_change(11, NODE), _change(12, PARENT)],
                                  "cursor": 15, "has_more": True},
        ("GET", "/changes", 15): {"changes": [_change(16, NODE)], "cursor": 16,
                                  "has_more": False}})
    api = Api(cast(Connection, connection))
    pages = [page async for page in api.change_pages(10)]
    assert [page.cursor for page in pages] == [15, 16]
    assert [len(page.changes) for page in pages] == [2, 1]
    assert connection.requests == [("GET", "/changes", {"cursor": 10, "limit": FEED_PAGE}),
                                   ("GET", "/changes", {"cursor": 15, "limit": FEED_PAGE})]
    assert [change.cursor async for change in api.changes(10)] == [11, 12, 16]


async def test_a_listing_follows_next_after_until_it_ends() -> None:
    path = f"/files/{PARENT}/children"
    connection = FakeConnection({
        ("GET", path, ""): {"nodes": [_node(NODE)], "next_after": NODE},
        ("GET", path, NODE): {"nodes": [_node("d" * 32)], "next_after": None}})
    api = Api(cast(Connection, connection))
    assert [node.id async for node in api.children(PARENT)] == [NODE, "d" * 32]
    assert [params for _, _, params in connection.requests] == [
        {"after": "", "limit": MAX_CHILDREN_PAGE}, {"after": NODE, "limit": MAX_CHILDREN_PAGE}]
