"""Every error `code` the API answers with, and the error body.

Every error answer is `{"error": {"code": CODE, "message": MESSAGE, ...details}}`; details
are extra machine-readable fields (`current_version` on a stale update, `root_id` when a
second root is refused, `retry_after_s` when rate-limited). Clients decide by `code`, never
by the HTTP status: a 404 may be "no such node" or "no such endpoint", a 503 "a disk is
missing, try again" or "the data is lost for now".
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    # requests
    BAD_REQUEST = "bad_request"              # 400: well-formed, but asks for something invalid
    INVALID_REQUEST = "invalid_request"      # 422: fails validation (fields, types, limits)
    UNAUTHORIZED = "unauthorized"            # 401: no token, an unknown one, a revoked device
    FORBIDDEN = "forbidden"                  # 403: refused URL, or a write to a read-only node
    ENROLLMENT_REFUSED = "enrollment_refused"  # 403: a code unknown, used, expired or wrong
    LAN_ADMISSION_DISABLED = "lan_admission_disabled"  # 403: the config forbids /devices/admit
    NOT_FOUND = "not_found"                  # 404: no such node/user (or not visible), route
    METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
    CONFLICT = "conflict"                    # 409: stale base_version, or a name/state clash
    GONE = "gone"                            # 410: collected after its grace period
    PAYLOAD_TOO_LARGE = "payload_too_large"  # 413: a body over the route's limit
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # 416
    RATE_LIMITED = "rate_limited"            # 429: slow down (Retry-After)
    INVALID_BLOCK_ID = "invalid_block_id"    # 400: not 64 lowercase hex digits
    # storage
    STORAGE = "storage"                      # 503: the store cannot do it now
    BLOCK_NOT_FOUND = "block_not_found"      # 404: no shard of the block anywhere
    BLOCK_ID_MISMATCH = "block_id_mismatch"  # 400: the bytes do not hash to the id
    BLOCK_UNRECOVERABLE = "block_unrecoverable"  # 503: too few healthy shards
    INSUFFICIENT_DISKS = "insufficient_disks"  # 507: too few writable disks
    DISK = "disk"                            # one disk failed (handled inside the store)
    SHARD_FORMAT = "shard_format"            # a shard that does not parse (handled inside)
    # the appliance itself (command line, or an unexpected failure)
    INTERNAL = "internal"                    # 500
    CONFIG = "config"
    HOME_EXISTS = "home_exists"
    LISTEN = "listen"
    HOME_BUSY = "home_busy"                  # another cairnd process owns the disks
    ADMIN = "admin"                          # the running appliance's admin socket failed
    RECOVER = "recover"                      # `cairnd recover` cannot rebuild a home
    HTTP_ERROR = "http_error"                # an HTTP status with no name of its own

    @classmethod
    def of(cls, text: str) -> ErrorCode | None:
        """The code named TEXT, or None for one this version does not know (a newer
        appliance's): callers treat that as a generic error."""
        try:
            return cls(text)
        except ValueError:
            return None


class ErrorInfo(BaseModel):
    """An error about one item of a batch (one operation, one block)."""

    code: str
    message: str


class ErrorDetail(ErrorInfo):
    model_config = ConfigDict(extra="allow")  # details, e.g. current_version on a 409


class ErrorBody(BaseModel):
    error: ErrorDetail
