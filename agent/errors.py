"""Every error the agent raises on purpose, in one tree.

    CairnAgentError                base; carries an exit code for the command line
    ├── UsageError                 a command asked for something that cannot be (exit 2)
    ├── NotEnrolledError           this home has no device credentials: run `cairn join`
    ├── EnrollmentError            joining failed: bad code, refused, no appliance vouched
    ├── WrongPassphraseError       the key bundle does not open with this passphrase
    ├── KeyPinError                another user's public key changed since first use
    ├── IntegrityError             ciphertext, metadata or a block that fails its check:
    │                              tampered with, corrupted, or moved between nodes
    ├── LocalFileError             a local file cannot be read or written
    │   ├── DiskFullError          no space left for a download
    │   ├── CacheFullError         the block cache's budget is taken by pinned blocks
    │   └── FileChangedError       a file changed while it was being uploaded
    ├── TransportError             the appliance cannot be reached (after retries and,
    │                              if enabled, an mDNS search for its new address)
    ├── IncompatibleApplianceError the appliance speaks another major API version
    ├── PeerError                  LAN peers: a device certificate that cannot be had or
    │   │                          used, a device CA other than the pinned one, a bad
    │   │                          [peers] config; peers stay off, nothing else stops
    │   └── PeerFetchError         one peer did not serve one request (timeout, refusal,
    │                              not held, not one of ours): the fetch policy moves the
    │                              block elsewhere; never shown to the user
    └── ApiError                   the appliance refused a request; carries status and code
        ├── RemoteNotFoundError    404: no such node, or one you may not see
        ├── ForbiddenError         403: read-only (shared with you), or a refused URL
        └── RemoteConflictError    409: someone changed the node meanwhile

Errors are translated once at each boundary: httpx exceptions and HTTP error bodies in
`agent.client`, OS errors in the transfer pipeline. The command line prints `message` on one
line and exits with `exit_code`, never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.models import NodeOut


class CairnAgentError(Exception):
    """Base class. `code` is a stable machine-readable name; `exit_code` is the CLI's."""

    code = "internal"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(CairnAgentError):
    code = "usage"
    exit_code = 2


class NotEnrolledError(CairnAgentError):
    code = "not_enrolled"
    exit_code = 3


class EnrollmentError(CairnAgentError):
    code = "enrollment"
    exit_code = 3


class WrongPassphraseError(CairnAgentError):
    code = "wrong_passphrase"
    exit_code = 3


class KeyPinError(CairnAgentError):
    code = "key_pin"
    exit_code = 5


class IntegrityError(CairnAgentError):
    code = "integrity"
    exit_code = 5


class LocalFileError(CairnAgentError):
    code = "local_file"
    exit_code = 6


class DiskFullError(LocalFileError):
    code = "disk_full"


class CacheFullError(LocalFileError):
    code = "cache_full"


class FileChangedError(LocalFileError):
    code = "file_changed"
    written: NodeOut | None = None   # the node version an aborted upload began


class UploadStalledError(CairnAgentError):
    """A file another device is uploading got no new block for a while: it is fetched
    once it is complete."""
    code = "upload_stalled"


class TransportError(CairnAgentError):
    code = "unreachable"
    exit_code = 4


class IncompatibleApplianceError(CairnAgentError):
    """The appliance answers with another major API version (protocol.version): update
    whichever side is older."""

    code = "api_version"
    exit_code = 12


class PeerError(CairnAgentError):
    """Something LAN peers need is missing or wrong (agent/peers): the device
    certificate, the pinned device CA, the `[peers]` section of HOME/config.toml. Only
    peers stop; syncing and mounting go on through the appliance."""

    code = "peer"
    exit_code = 13


class PeerFetchError(PeerError):
    """A request to one peer failed. `failure` is an agent.peers.fetch.Failure value
    ("timeout", "error", "refused", "not_held", "wrong_bytes"): what the fetch policy
    does with the peer and the block (agent/peers/peer_client.py raises it)."""

    code = "peer_fetch"

    def __init__(self, message: str, failure: str) -> None:
        super().__init__(message)
        self.failure = failure


class ApiError(CairnAgentError):
    """The appliance answered with an error. `api_code` is the error body's code (a
    protocol.errors.ErrorCode, or "" for an answer that is not a Cairn error), `details`
    its extra fields (e.g. `current_version`), `status` the HTTP status (for messages)."""

    code = "api"
    exit_code = 7

    def __init__(self, message: str, *, status: int = 0, api_code: str = "",
                 details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.api_code = api_code
        self.details = details or {}


class RemoteNotFoundError(ApiError):
    code = "not_found"
    exit_code = 8


class ForbiddenError(ApiError):
    code = "forbidden"
    exit_code = 9


class RemoteConflictError(ApiError):
    code = "conflict"
    exit_code = 10


class SyncPausedError(CairnAgentError):
    """`cairn sync --once` stopped at a safety check (a vanished or emptied folder, a
    mass deletion): nothing was deleted."""
    code = "sync_paused"
    exit_code = 11
