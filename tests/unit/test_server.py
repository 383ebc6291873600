"""The HTTP API in process (httpx ASGI transport, trio), over a fake disk-status source."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from appliance.api.context import ApiContext, ApiSettings
from appliance.errors import BlockNotFoundError, InsufficientDisksError
from appliance.meta import accounts
from appliance.meta.database import Metadata
from appliance.server import create_app
from protocol.enrollment import enrollment_response


@dataclass(frozen=True)
class FakeStatus:
    name: str
    state: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": f"/d/{self.name}", "state": self.state,
                "shard_count": 3, "free_bytes": 10, "total_bytes": 20, "recent_errors": 0,
                "detail": ""}


class FakeStore:
    def __init__(self, states: list[str]) -> None:
        self.states = states

    async def disk_status(self, count_shards: bool = True) -> list[FakeStatus]:
        return [FakeStatus(f"disk{i}", state) for i, state in enumerate(self.states)]


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "appliance.db"


def make_app(states: list[str], database: Path) -> FastAPI:
    meta = Metadata(database)
    store: Any = FakeStore(states)
    context = ApiContext(meta=meta, store=store, url_key=b"k" * 32, fingerprint=b"f" * 32,
                         appliance_id="the-id", settings=ApiSettings())
    return create_app(store, context)


def device_token(database: Path) -> str:
    """A device of a new user, enrolled straight through the database."""
    meta = Metadata(database)

    def enroll(db: Any) -> str:
        code, _ = accounts.issue_code(db, accounts.add_user(db, "admin"))
        nonce = b"n" * 32
        response = enrollment_response(code.key(), nonce, b"f" * 32)
        outcome = accounts.redeem_code(db, code.code_id_text, nonce, response, b"f" * 32,
                                       "console")
        assert outcome is not None
        return outcome[1]

    try:
        return meta.write_sync(enroll)
    finally:
        meta.close()


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_health_ok(database: Path) -> None:
    async with client(make_app(["ok", "ok", "ok"], database)) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["appliance_id"] == "the-id"
    assert body["disks"] == {"ok": 3, "total": 3}
    assert body["version"]


async def test_health_degraded_when_a_disk_is_not_ok(database: Path) -> None:
    async with client(make_app(["ok", "missing", "read-only"], database)) as http:
        body = (await http.get("/health")).json()
    assert body["status"] == "degraded"
    assert body["disks"] == {"ok": 1, "total": 3}


async def test_disks_needs_a_device(database: Path) -> None:
    token = device_token(database)
    async with client(make_app(["ok", "blank", "ok"], database)) as http:
        anonymous = await http.get("/disks")
        body = (await http.get("/disks", headers={"Authorization": f"Bearer {token}"})).json()
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert [d["state"] for d in body] == ["ok", "blank", "ok"]
    assert body[1]["path"] == "/d/disk1"
    assert body[0]["shard_count"] == 3


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/nope", 404, "not_found"),
    ("POST", "/health", 405, "method_not_allowed"),
])
async def test_http_errors_have_the_json_shape(method: str, path: str, status: int,
                                               code: str, database: Path) -> None:
    async with client(make_app(["ok"] * 3, database)) as http:
        response = await http.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


async def test_our_errors_validation_errors_and_crashes(database: Path) -> None:
    app = make_app(["ok"] * 3, database)

    @app.get("/raise/{kind}")
    async def raise_(kind: str, n: int = 0) -> dict[str, str]:
        if kind == "missing":
            raise BlockNotFoundError("no such block")
        if kind == "disks":
            raise InsufficientDisksError("only 3 writable disks")
        raise RuntimeError("boom: secret detail")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        missing = await http.get("/raise/missing")
        disks = await http.get("/raise/disks")
        invalid = await http.get("/raise/x?n=seven")
        crash = await http.get("/raise/crash")
    assert (missing.status_code, missing.json()) == (
        404, {"error": {"code": "block_not_found", "message": "no such block"}})
    assert disks.status_code == 507
    assert disks.json()["error"]["code"] == "insufficient_disks"
    assert invalid.status_code == 422
    assert invalid.json()["error"]["code"] == "invalid_request"
    assert "query.n" in invalid.json()["error"]["message"]
    assert crash.status_code == 500
    assert crash.json()["error"]["code"] == "internal"
    assert "secret" not in crash.text


async def test_openapi_document(database: Path) -> None:
    async with client(make_app(["ok"] * 3, database)) as http:
        document = (await http.get("/openapi.json")).json()
    assert {"/health", "/disks"} <= set(document["paths"])
