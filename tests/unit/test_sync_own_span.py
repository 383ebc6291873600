"""Which feed spans a batch of small uploads may skip (agent/sync/batch.py own_span, pure):
only one filled by exactly this batch's changes, each file complete in its answer."""

from __future__ import annotations

from typing import Any

from agent.sync.batch import own_span
from protocol.models import BatchResponse

NODE = {"id": "a" * 32, "owner": "u", "parent": "b" * 32, "kind": "file", "version": 1,
        "status": "uploaded", "deleted": False, "deleted_at": None, "size": 1,
        "block_count": 1, "metadata": "bQ==", "wrapped_key": "aw==", "created_at": 1.0,
        "updated_at": 1.0, "updated_by": None}


def answer(added: int, *, failed: int = 0, status: str = "uploaded",
           upload: list[dict[str, Any]] | None = None,
           feed: bool = True) -> BatchResponse:
    ok = {"ok": True, "result": {"node": {**NODE, "status": status},
                                 "upload": upload or [], "urls_expire_at": None}}
    bad = {"ok": False, "error": {"code": "conflict", "message": "stale"}}
    return BatchResponse.model_validate({
        "results": [ok, ok, *[bad] * failed],
        "feed": {"before": 10, "after": 10 + added, "added": added} if feed else None})


def test_a_span_of_exactly_our_complete_writes_is_ours() -> None:
    span = own_span(answer(2))
    assert span is not None and (span.before, span.after, span.added) == (10, 12, 2)
    assert own_span(answer(2, failed=3)) is not None     # failed ones changed nothing


def test_anything_else_in_the_span_or_more_to_come_is_not() -> None:
    assert own_span(answer(3)) is None          # a change we did not make or see
    assert own_span(answer(1)) is None          # a create answered from an earlier try
    assert own_span(answer(2, status="uploading")) is None
    assert own_span(answer(2, upload=[{"block_id": "c" * 64, "size": 17,
                                       "url": "/blocks/x"}])) is None
    assert own_span(answer(2, feed=False)) is None       # an appliance before API 1.1
