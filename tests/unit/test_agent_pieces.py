"""Pure pieces of the agent: retry delays, error translation, interface choice for mDNS,
download planning against the metadata, public-key pinning, first-error selection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.client import RetryPolicy, _transient, error_from_status
from agent.crypto.blocks import encrypt_block
from agent.crypto.nodes import NodeMeta
from agent.discovery import lan_addresses
from agent.download import plan_blocks
from agent.errors import (
    ApiError,
    ForbiddenError,
    IntegrityError,
    KeyPinError,
    NotEnrolledError,
    RemoteConflictError,
    RemoteNotFoundError,
    UsageError,
)
from agent.home import AgentHome
from agent.pipeline import first_error, run_jobs
from agent.remote import RemoteNode
from protocol.models import BlockUrl


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(attempts=8, first_delay_s=0.25, max_delay_s=2.0)
    for attempt in range(8):
        ceiling = min(2.0, 0.25 * 2 ** attempt)
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(0, retry_after=1.5) == 1.5
    assert policy.delay(0, retry_after=60) == 2.0


@pytest.mark.parametrize(("status", "code", "kind"), [
    (404, "not_found", RemoteNotFoundError), (404, "block_not_found", RemoteNotFoundError),
    (403, "forbidden", ForbiddenError), (403, "enrollment_refused", ForbiddenError),
    (409, "conflict", RemoteConflictError), (401, "unauthorized", NotEnrolledError),
    (500, "internal", ApiError), (410, "gone", ApiError),
    # the code decides, never the status: an unknown code is a plain ApiError whatever
    # the status, and a known code means the same under any status
    (404, "x", ApiError), (403, "x", ApiError), (409, "x", ApiError), (401, "x", ApiError),
    (400, "conflict", RemoteConflictError)])
def test_error_bodies_become_agent_errors_by_code(status: int, code: str,
                                                  kind: type[Exception]) -> None:
    body = json.dumps({"error": {"code": code, "message": "said the appliance",
                                 "current_version": 7}}).encode()
    error = error_from_status(status, body)
    assert type(error) is kind
    if isinstance(error, ApiError):
        assert error.message == "said the appliance"
        assert error.details == {"current_version": 7}
        assert error.api_code == (code if code != "x" else "")
        assert error.status == status


@pytest.mark.parametrize(("status", "code", "transient"), [
    (429, "rate_limited", True), (503, "storage", True), (503, "block_unrecoverable", False),
    (404, "block_not_found", False), (507, "insufficient_disks", False),
    (502, None, True), (503, None, True), (504, None, True), (500, None, False),
    (200, "rate_limited", False)])   # a success is never retried (nor its body parsed)
def test_what_is_worth_a_retry(status: int, code: str | None, transient: bool) -> None:
    body = b"<html>proxy</html>" if code is None else json.dumps(
        {"error": {"code": code, "message": "m"}}).encode()
    assert _transient(status, body) is transient


def test_error_without_json_body_keeps_the_text() -> None:
    error = error_from_status(502, b"<html>bad gateway</html>")
    assert isinstance(error, ApiError) and "bad gateway" in error.message


def test_mdns_browses_lan_addresses_only() -> None:
    assert lan_addresses(["127.0.0.1", "::1", "fe80::1%eth0", "10.0.0.5", "192.168.1.2",
                          "2001:db8::1", "not-an-ip"]) == ["10.0.0.5", "192.168.1.2",
                                                           "2001:db8::1"]


def _node(blocks: list[bytes], node_id: str = "ab" * 16) -> RemoteNode:
    refs = tuple(encrypt_block(b"s" * 32, b)[0] for b in blocks)
    meta = NodeMeta("f", "file", sum(len(b) for b in blocks), 0, 0o644, refs)
    return RemoteNode(id=node_id, parent="cd" * 16, kind="file", version=1,
                      status="uploaded", deleted=False, owner="alice", created_at=0,
                      updated_at=0, key=b"k" * 32, meta=meta)


def _url(block_id: str) -> BlockUrl:
    return BlockUrl(block_id=block_id, size=1, url="u")


def test_download_plan_fetches_repeated_blocks_once() -> None:
    node = _node([b"a" * 10, b"b" * 10, b"a" * 10])
    urls = [BlockUrl(block_id=r.id_hex, size=r.cipher_size, url=f"/blocks/{i}")
            for i, r in enumerate(node.meta.blocks)]
    jobs = plan_blocks(node, urls)
    assert [job.offsets for job in jobs] == [(0, 20), (10,)]


def test_download_plan_refuses_a_list_other_than_the_metadata() -> None:
    node = _node([b"a" * 10, b"b" * 10])
    ids = [r.id_hex for r in node.meta.blocks]
    with pytest.raises(IntegrityError):
        plan_blocks(node, [_url(ids[1]), _url(ids[0])])
    with pytest.raises(IntegrityError):
        plan_blocks(node, [_url(ids[0])])


def test_public_keys_are_pinned_on_first_use(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "home")
    first, second = os.urandom(32), os.urandom(32)
    assert home.pin_public_key("bob", first) == first
    assert home.pin_public_key("bob", first) == first
    with pytest.raises(KeyPinError, match="changed"):
        home.pin_public_key("bob", second)
    assert home.pinned_public_key("bob") == first
    assert (tmp_path / "home" / "peers.json").stat().st_mode & 0o777 == 0o600


async def test_run_jobs_raises_our_error_itself_not_a_group() -> None:
    def work(n: int) -> int:
        if n == 3:
            raise UsageError("job 3 failed")
        return n * 2

    seen: list[int] = []
    with pytest.raises(UsageError, match="job 3"):
        await run_jobs(list(range(6)), work, parallel=2,
                       done=lambda job, result: seen.append(result))
    assert 6 not in seen


async def test_run_jobs_runs_every_job() -> None:
    seen: list[tuple[int, int]] = []
    await run_jobs(list(range(20)), lambda n: n * n, parallel=4,
                   done=lambda job, result: seen.append((job, result)))
    assert sorted(seen) == [(n, n * n) for n in range(20)]


def test_first_error_prefers_our_errors() -> None:
    group = BaseExceptionGroup("x", [RuntimeError("boom"), UsageError("ours")])
    assert isinstance(first_error(group), UsageError)
    assert isinstance(first_error(BaseExceptionGroup("y", [RuntimeError("boom")])),
                      RuntimeError)
