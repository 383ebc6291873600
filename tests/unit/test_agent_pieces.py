"""Pure pieces of the agent: retry delays, error translation, interface choice for mDNS,
download planning against the metadata, public-key pinning, first-error selection."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.client import RetryPolicy, error_from_status
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


def test_retry_delays_grow_and_are_capped() -> None:
    policy = RetryPolicy(attempts=8, first_delay_s=0.25, max_delay_s=2.0)
    for attempt in range(8):
        ceiling = min(2.0, 0.25 * 2 ** attempt)
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    assert policy.delay(0, retry_after=1.5) == 1.5
    assert policy.delay(0, retry_after=60) == 2.0


@pytest.mark.parametrize(("status", "kind"), [
    (404, RemoteNotFoundError), (403, ForbiddenError), (409, RemoteConflictError),
    (401, NotEnrolledError), (500, ApiError)])
def test_error_bodies_become_agent_errors(status: int, kind: type[Exception]) -> None:
    body = json.dumps({"error": {"code": "x", "message": "said the appliance",
                                 "current_version": 7}}).encode()
    error = error_from_status(status, body)
    assert type(error) is kind
    if isinstance(error, ApiError):
        assert error.message == "said the appliance"
        assert error.details == {"current_version": 7}


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


def test_download_plan_fetches_repeated_blocks_once() -> None:
    node = _node([b"a" * 10, b"b" * 10, b"a" * 10])
    urls = [{"block_id": r.id_hex, "url": f"/blocks/{i}"} for i, r in
            enumerate(node.meta.blocks)]
    jobs = plan_blocks(node, urls)
    assert [job.offsets for job in jobs] == [(0, 20), (10,)]


def test_download_plan_refuses_a_list_other_than_the_metadata() -> None:
    node = _node([b"a" * 10, b"b" * 10])
    ids = [r.id_hex for r in node.meta.blocks]
    with pytest.raises(IntegrityError):
        plan_blocks(node, [{"block_id": ids[1], "url": "u"}, {"block_id": ids[0],
                                                              "url": "u"}])
    with pytest.raises(IntegrityError):
        plan_blocks(node, [{"block_id": ids[0], "url": "u"}])


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
