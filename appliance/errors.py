"""Every error the appliance raises on purpose, in one tree.

    CairnApplianceError            base; carries an exit code (CLI) and an HTTP status (API)
    ├── ConfigError                config.toml missing, unreadable or invalid
    │   ├── HomeExistsError        `cairnd init` refuses to overwrite an existing home
    │   └── RecoverError           `cairnd recover` finds no usable copy of a home
    ├── StorageError               the block store cannot do what was asked
    │   ├── BlockNotFoundError     no shard of the block exists on any reachable disk
    │   ├── BlockIdMismatchError   `put` was given bytes whose BLAKE3 hash is not the id
    │   ├── BlockUnrecoverableError fewer than the needed shards are healthy: data is lost
    │   │                          for now (a missing disk may still bring it back)
    │   ├── InsufficientDisksError too few writable disks to store a block safely
    │   ├── DiskError              one disk failed an operation; the store marks the disk
    │   │                          (read-only, full, failing, missing) and uses the others
    │   └── ShardFormatError       bytes that are not a valid shard (bad magic, version,
    │                              checksum, truncated); caught inside the store, which
    │                              treats the shard as bad and repairs it
    ├── InvalidBlockIdError        a block id that is not 64 lowercase hex digits
    ├── ListenError                `cairnd serve` cannot listen on its address (in use,
    │                              not an address of this machine, not permitted)
    ├── HomeBusyError              another cairnd process owns the home's disks
    ├── AdminError                 a command run by the serving appliance failed there
    └── RequestError               an API or account request that cannot be honoured
        ├── BadRequestError        400: well-formed JSON that asks for something invalid
        ├── UnauthorizedError      401: no token, an unknown one, or a revoked device
        ├── ForbiddenError         403: a URL that is expired, forged or re-targeted,
        │                          or a write to something the caller may only read
        ├── NotFoundError          404: no such user or node, or not visible to the caller
        ├── ConflictError          409: stale base_version, or a name/state clash
        ├── GoneError              410: the data was garbage-collected after its grace
        ├── PayloadTooLargeError   413: a body over the route's limit
        ├── RequestTimeoutError    408: a body that stalled or came too slowly
        ├── EnrollmentError        403: a code that is unknown, used, expired or wrong
        ├── LanAdmissionDisabledError 403: the config forbids admitting devices from the LAN
        └── RateLimitedError       429: too many requests from one device; retry later

Errors are translated once at each boundary: the CLI prints `message` on one line and exits
with `exit_code`; the HTTP layer answers `{"error": {"code", "message"}}` with `http_status`.
Every `code` is a member of protocol.errors.ErrorCode, which the agent maps from.
"""

from __future__ import annotations

from protocol.errors import ErrorCode


class CairnApplianceError(Exception):
    """Base class. `code` is a stable machine-readable name used in API error bodies."""

    code: ErrorCode = ErrorCode.INTERNAL
    exit_code = 1
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CairnApplianceError):
    """The appliance home or its config.toml is missing, unreadable or invalid."""

    code = ErrorCode.CONFIG
    exit_code = 2


class HomeExistsError(ConfigError):
    """`cairnd init` was pointed at a home that already holds an appliance."""

    code = ErrorCode.HOME_EXISTS


class StorageError(CairnApplianceError):
    """The block store could not complete an operation."""

    code = ErrorCode.STORAGE
    http_status = 503


class BlockNotFoundError(StorageError):
    """No reachable disk holds any shard of the block."""

    code = ErrorCode.BLOCK_NOT_FOUND
    http_status = 404


class BlockIdMismatchError(StorageError):
    """The bytes offered to `put` do not hash (BLAKE3) to the block id they were sent as."""

    code = ErrorCode.BLOCK_ID_MISMATCH
    http_status = 400


class BlockUnrecoverableError(StorageError):
    """Fewer healthy shards than needed to decode the block. Bringing a missing disk back
    (or restoring it from elsewhere) is the only way to recover it."""

    code = ErrorCode.BLOCK_UNRECOVERABLE
    http_status = 503


class InsufficientDisksError(StorageError):
    """Too few disks accept writes to store a block with the required redundancy
    (at least k+1 erasure shards, or 2 replicas for small blocks)."""

    code = ErrorCode.INSUFFICIENT_DISKS
    http_status = 507


class DiskError(StorageError):
    """An operation on one disk failed. Raised by appliance.storage.disk and handled inside
    the block store, which records the disk's new state and carries on with other disks."""

    code = ErrorCode.DISK

    def __init__(self, disk_name: str, message: str) -> None:
        super().__init__(f"disk {disk_name}: {message}")
        self.disk_name = disk_name


class ShardFormatError(StorageError):
    """Bytes that do not parse as a valid shard: wrong magic or version, checksum mismatch,
    truncated payload. The store catches this and treats the shard as bad."""

    code = ErrorCode.SHARD_FORMAT


class InvalidBlockIdError(CairnApplianceError):
    """A block id must be the 64-character lowercase hex form of a BLAKE3 digest."""

    code = ErrorCode.INVALID_BLOCK_ID
    exit_code = 2
    http_status = 400


class ListenError(CairnApplianceError):
    """`cairnd serve` could not bind its listening socket. Choose another address with
    `--listen` or `[server] listen` in config.toml, or stop what holds the port."""

    code = ErrorCode.LISTEN
    exit_code = 3


class HomeBusyError(CairnApplianceError):
    """Another cairnd process owns this home's disks (a serve, or a scrub/fsck working on
    the disks directly), and what was asked cannot go through it."""

    code = ErrorCode.HOME_BUSY
    exit_code = 3


class AdminError(CairnApplianceError):
    """A command sent to the running appliance through its admin socket failed there;
    `exit_code` is the one the command would have exited with."""

    code = ErrorCode.ADMIN

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RecoverError(ConfigError):
    """`cairnd recover` found no usable copy of the home on the disks given."""

    code = ErrorCode.RECOVER


class RequestError(CairnApplianceError):
    """A request (HTTP or `cairnd user/device`) that cannot be honoured as asked.
    `details` are extra machine-readable fields merged into the API error body."""

    code = ErrorCode.BAD_REQUEST
    exit_code = 2
    http_status = 400

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class BadRequestError(RequestError):
    code = ErrorCode.BAD_REQUEST


class UnauthorizedError(RequestError):
    code = ErrorCode.UNAUTHORIZED
    http_status = 401


class ForbiddenError(RequestError):
    code = ErrorCode.FORBIDDEN
    http_status = 403


class NotFoundError(RequestError):
    code = ErrorCode.NOT_FOUND
    http_status = 404


class ConflictError(RequestError):
    code = ErrorCode.CONFLICT
    http_status = 409


class GoneError(RequestError):
    code = ErrorCode.GONE
    http_status = 410


class PayloadTooLargeError(RequestError):
    code = ErrorCode.PAYLOAD_TOO_LARGE
    http_status = 413


class RequestTimeoutError(RequestError):
    """A request body stalled or came too slowly (appliance/api/bodylimit.py); the
    connection is closed after the answer. (408 has no code of its own in the protocol.)"""

    code = ErrorCode.HTTP_ERROR
    http_status = 408


class EnrollmentError(RequestError):
    code = ErrorCode.ENROLLMENT_REFUSED
    http_status = 403


class LanAdmissionDisabledError(RequestError):
    """POST /devices/admit while `[enrollment] lan_admission = false`: new devices join
    with an enrollment code from the appliance's console only."""

    code = ErrorCode.LAN_ADMISSION_DISABLED
    http_status = 403


class RateLimitedError(RequestError):
    code = ErrorCode.RATE_LIMITED
    http_status = 429

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 3))
        self.retry_after_s = retry_after_s
