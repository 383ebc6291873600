"""The appliance's HTTP API (FastAPI on trio, through anyio; served by appliance.serve).

Every error leaves as `{"error": {"code": CODE, "message": MESSAGE}}` with a fitting HTTP
status: our own errors carry both (appliance.errors), HTTP errors from routing get a code
named after their status, request validation errors are 422 `invalid_request`, and anything
unexpected is logged with its traceback and answered as 500 `internal` without details.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from http import HTTPStatus
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.api import (
    routes_accounts,
    routes_blocks,
    routes_changes,
    routes_devices,
    routes_files,
    routes_sharing,
)
from appliance.api.bodylimit import BodyLimit
from appliance.api.context import ApiContext, CallerDep
from appliance.api.version_header import ApiVersionHeader
from appliance.errors import CairnApplianceError, RateLimitedError, RequestError
from appliance.storage.async_store import AsyncBlockStore
from protocol import version as api_version
from protocol.errors import ErrorBody, ErrorCode, ErrorDetail
from protocol.limits import MAX_BATCH_BODY_BYTES, MAX_BLOCK_BYTES, MAX_BLOCKS_BODY_BYTES
from protocol.models import DiskCounts, DiskInfo, Health

log = logging.getLogger("cairnd.api")


def cairn_version() -> str:
    try:
        return version("cairn")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


# --- response bodies (they also document the API in /openapi.json) ---------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorBody, "description": "Any error"},
}


# --- errors --------------------------------------------------------------------------------

def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None,
                   details: Mapping[str, Any] | None = None) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, **(details or {})))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _status_code_name(status: int) -> str:
    try:
        name = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return ErrorCode.HTTP_ERROR
    return ErrorCode.of(name) or ErrorCode.HTTP_ERROR


async def _on_cairn_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CairnApplianceError)
    if exc.http_status >= 500:
        log.warning("%s %s failed: %s", request.method, request.url.path, exc.message)
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif exc.http_status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="cairn"'
    details = exc.details if isinstance(exc, RequestError) else None
    return error_response(exc.http_status, exc.code, exc.message, headers=headers,
                          details=details)


# FastAPI's answer when reading or decoding a JSON body raised something it did not expect:
# our PayloadTooLargeError from BodyLimit (a chunked body over the limit), or a body that is
# not UTF-8 or nests too deeply for the JSON parser.
_BODY_NOT_PARSED = "There was an error parsing the body"


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_NOT_PARSED:
        if isinstance(exc.__cause__, CairnApplianceError):
            return await _on_cairn_error(request, exc.__cause__)
        return error_response(422, ErrorCode.INVALID_REQUEST, "invalid request: the body "
                              "is not valid JSON (not UTF-8, or nested too deeply)")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path}"
    return error_response(exc.status_code, _status_code_name(exc.status_code), message,
                          headers=exc.headers)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return error_response(422, ErrorCode.INVALID_REQUEST,
                          "invalid request: " + "; ".join(problems or ["malformed"]))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: unexpected error", request.method, request.url.path, exc_info=exc)
    return error_response(500, ErrorCode.INTERNAL,
                          "internal error; the appliance log has details")


# --- the app -------------------------------------------------------------------------------

def create_app(store: AsyncBlockStore, context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="Cairn appliance",
        version=cairn_version(),
        description="Self-hosted, end-to-end encrypted file storage. Errors are always "
                    '`{"error": {"code", "message"}}`.',
        responses=ERROR_RESPONSES,
    )
    app.add_exception_handler(CairnApplianceError, _on_cairn_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    app.state.context = context
    for module in (routes_accounts, routes_files, routes_blocks, routes_sharing,
                   routes_changes, routes_devices):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, rules=[
        ("PUT", "/blocks/", MAX_BLOCK_BYTES),
        ("POST", "/blocks", MAX_BLOCKS_BODY_BYTES),
        ("POST", "/batch/", MAX_BATCH_BODY_BYTES),
    ])
    app.add_middleware(ApiVersionHeader)     # outermost: BodyLimit's refusals carry it too

    @app.get("/health", response_model=Health, tags=["appliance"])
    async def health() -> Health:
        """Liveness and a summary of disk health: `degraded` when any disk is not `ok`
        (the appliance still serves; see /disks for which and why)."""
        statuses = await store.disk_status(count_shards=False)
        ok = sum(1 for status in statuses if status.to_json()["state"] == "ok")
        return Health(
            status="ok" if ok == len(statuses) else "degraded",
            appliance_id=context.appliance_id,
            version=cairn_version(),
            api_version=api_version.API_VERSION,
            disks=DiskCounts(ok=ok, total=len(statuses)),
        )

    @app.get("/disks", response_model=list[DiskInfo], tags=["appliance"])
    async def disks(caller: CallerDep) -> list[DiskInfo]:
        """Every disk slot: path, state (ok, missing, blank, read-only, full, failing,
        foreign), shard count and free space. Needs a device token: paths and free space
        are the appliance's business, not the LAN's."""
        statuses = await store.disk_status()
        return [DiskInfo.model_validate(status.to_json()) for status in statuses]

    return app
