"""The API's request and response bodies: the appliance's routes validate requests and
document the API (/openapi.json) with them, the agent's client reads answers into them.

Binary values (ciphertext, keys, proofs) travel as standard base64 strings (protocol.ids);
ids are lowercase hex. Every limit a client can hit is in protocol.limits.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import ErrorInfo
from protocol.ids import BLOCK_ID_PATTERN, NODE_ID_PATTERN
from protocol.limits import (
    MAX_BATCH_BLOCKS,
    MAX_BATCH_OPERATIONS,
    MAX_BLOCK_BYTES,
    MAX_BLOCKS_PER_NODE,
    MAX_DEVICE_NAME,
    MAX_KEY_BUNDLE_B64,
    MAX_METADATA_B64,
    MAX_SHARE_GRANTS,
    MAX_USER_NAME,
    MAX_WRAPPED_KEY_B64,
)

Base64 = str
NodeKind = Literal["file", "dir"]
NodeStatus = Literal["uploading", "uploaded"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- accounts ------------------------------------------------------------------------------

class EnrollChallenge(Strict):
    code_id: str = Field(min_length=8, max_length=8, description="The code's first 8 "
                         "characters (without dashes).")
    nonce: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$",
                       description="32 random bytes, hex, chosen by the device.")


class EnrollProof(BaseModel):
    appliance_id: str
    api_version: str
    proof: str = Field(description="hex HMAC proving the appliance knows the code and "
                       "serves the certificate the device sees; see docs/enrollment.md")


class EnrollRedeem(EnrollChallenge):
    response: str = Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")
    device_name: str = Field(min_length=1, max_length=MAX_DEVICE_NAME)


class EnrollResult(BaseModel):
    device_id: str
    token: str = Field(description="The device's bearer token. Shown once; keep it 0600.")
    user: str
    appliance_id: str


class Me(BaseModel):
    user: str
    device_id: str
    device_name: str
    root_id: str | None
    has_key_bundle: bool
    latest_cursor: int
    epoch: str | None = Field(None, description="API 1.3: names the database's history; "
                              "a new one after the appliance was recovered from an older "
                              "copy (changes seen since may be gone: re-send them). Null "
                              "from appliances before 1.3.")
    epoch_started_at: float | None = Field(None, description="API 1.3: when the epoch "
                                           "began (unix time, the appliance's clock): a "
                                           "node changed before it came back with the "
                                           "copy, one changed after was changed since.")
    epoch_started_cursor: int | None = Field(None, description="API 1.4: the newest "
                                             "change cursor when the epoch began: the "
                                             "feed after it is what changed since (a "
                                             "node's first change there says which "
                                             "version the copy had). Null if not known "
                                             "(an epoch no recovery began, or before 1.4).")


class KeyBundle(BaseModel):
    public_key: Base64 | None
    bundle: Base64 | None
    version: int


class KeyBundleUpdate(Strict):
    public_key: Base64 = Field(max_length=256)
    bundle: Base64 = Field(max_length=MAX_KEY_BUNDLE_B64)
    base_version: int = Field(ge=0)


class PublicKey(BaseModel):
    user: str
    public_key: Base64


# --- nodes ---------------------------------------------------------------------------------

class BlockIn(Strict):
    id: str = Field(pattern=BLOCK_ID_PATTERN)
    size: int = Field(gt=0, le=MAX_BLOCK_BYTES)


class NodeCreate(Strict):
    id: str | None = Field(None, pattern=NODE_ID_PATTERN, description="Optional client-"
                           "chosen id: repeating a create with the same id and content "
                           "is answered with the same node (safe retries).")
    parent: str | None = Field(pattern=NODE_ID_PATTERN, description="null for the root")
    kind: NodeKind
    metadata: Base64 = Field(max_length=MAX_METADATA_B64)
    wrapped_key: Base64 = Field(max_length=MAX_WRAPPED_KEY_B64)
    size: int = Field(0, ge=0)
    blocks: list[BlockIn] = Field(default_factory=list, max_length=MAX_BLOCKS_PER_NODE)


class NodeUpdate(Strict):
    base_version: int = Field(ge=1, description="The version this change is based on; a "
                              "stale one gets 409 with current_version.")
    parent: str | None = Field(None, pattern=NODE_ID_PATTERN,
                               description="Present to move the node under this folder.")
    metadata: Base64 = Field(max_length=MAX_METADATA_B64)
    wrapped_key: Base64 = Field(max_length=MAX_WRAPPED_KEY_B64)
    size: int | None = Field(None, ge=0, description="Required with blocks.")
    blocks: list[BlockIn] | None = Field(None, max_length=MAX_BLOCKS_PER_NODE,
                                         description="Omit to keep the current blocks.")


class VersionBody(Strict):
    base_version: int = Field(ge=1)


class NodeOut(BaseModel):
    id: str
    owner: str
    parent: str | None
    kind: NodeKind
    version: int
    status: NodeStatus
    deleted: bool
    deleted_at: float | None
    size: int
    block_count: int
    metadata: Base64
    wrapped_key: Base64
    created_at: float
    updated_at: float
    updated_by: str | None


class BlockUrl(BaseModel):
    block_id: str
    size: int
    url: str = Field(description="Path and query, relative to the appliance's base URL.")


class NodeWrite(BaseModel):
    """A created or updated node, with upload URLs for the blocks the appliance lacks."""

    node: NodeOut
    upload: list[BlockUrl]
    urls_expire_at: int | None


class NodeDetail(BaseModel):
    node: NodeOut
    method: Literal["GET", "PUT"] | None = Field(description="GET: download URLs for the "
                                                 "node's blocks in order (with stored_only, "
                                                 "of a file still uploading: those stored so "
                                                 "far, each once); PUT: upload URLs for the "
                                                 "blocks still missing")
    blocks: list[BlockUrl]
    urls_expire_at: int | None
    peer_grants: list[str] = Field(default_factory=list, description="API 1.5: with GET "
                                   "URLs, block grants (protocol/peers.py) for the calling "
                                   "device's certificate, covering these blocks, at most "
                                   "64 each: the user's other devices on the LAN serve "
                                   "the blocks against them. Empty when the device has no "
                                   "certificate yet.")


class DeviceCertificateRequest(Strict):
    """API 1.5, POST /devices/me/certificate: sign this device's public key."""

    public_key: str = Field(max_length=4096, description="The device's Ed25519 public "
                            "key, PEM (SubjectPublicKeyInfo)")


class DeviceCertificate(BaseModel):
    certificate: str = Field(description="PEM, signed by the device CA, valid 24 h")
    ca_certificate: str = Field(description="PEM: the appliance's device CA (pin it)")
    expires_at: int
    user_tag: str = Field(description="The opaque user id the certificate carries (O=)")


class RevocationList(BaseModel):
    """API 1.5, GET /devices/revoked: every revoked device id of this appliance."""

    revoked: list[str]
    as_of: float


class AdmitRequest(Strict):
    """API 1.5, POST /devices/admit: an enrolled device admits a new device of its own
    user that asked on the LAN (`cairn join --lan`)."""

    device_name: str = Field(min_length=1, max_length=MAX_DEVICE_NAME)
    public_key: str = Field(max_length=4096, description="The new device's Ed25519 "
                            "public key, PEM")


class AdmitResult(BaseModel):
    device_id: str
    token: str = Field(description="The new device's bearer token; only the new device "
                       "keeps it")
    user: str
    appliance_id: str
    certificate: DeviceCertificate


class NodeList(BaseModel):
    nodes: list[NodeOut]
    next_after: str | None


class ChangeOut(BaseModel):
    cursor: int
    node_id: str
    version: int
    kind: str
    at: float
    device_id: str | None
    node: NodeOut | None = Field(None, description="The node as it is now, if the caller "
                                 "can still see it (null after an unshare, say).")


class NodeHistory(BaseModel):
    node_id: str
    changes: list[ChangeOut]


class ChangesPage(BaseModel):
    changes: list[ChangeOut]
    cursor: int = Field(description="Pass this as ?cursor= next time.")
    has_more: bool
    epoch: str | None = Field(None, description="API 1.3: the epoch these cursors belong "
                              "to (as in GET /me). Another one than before means the "
                              "appliance was recovered from an older copy: the cursor "
                              "means nothing any more; list the tree again.")


# --- sharing -------------------------------------------------------------------------------

class GrantIn(Strict):
    user: str = Field(min_length=1, max_length=MAX_USER_NAME)
    wrapped_key: Base64 = Field(max_length=MAX_WRAPPED_KEY_B64)


class ShareRequest(Strict):
    grants: list[GrantIn] = Field(min_length=1, max_length=MAX_SHARE_GRANTS)


class GrantOut(BaseModel):
    user: str
    node_id: str
    wrapped_key: Base64
    granted_at: float


class Grants(BaseModel):
    grants: list[GrantOut]


class SharedItem(BaseModel):
    node: NodeOut
    owner: str
    wrapped_key: Base64 = Field(description="The node key wrapped for your public key.")
    granted_at: float


class SharedWithMe(BaseModel):
    items: list[SharedItem]


# --- batches -------------------------------------------------------------------------------

class BatchCreate(NodeCreate):
    op: Literal["create"]


class BatchUpdate(NodeUpdate):
    op: Literal["update"]
    node_id: str = Field(pattern=NODE_ID_PATTERN)


class BatchDelete(VersionBody):
    op: Literal["delete"]
    node_id: str = Field(pattern=NODE_ID_PATTERN)


class BlockData(Strict):
    id: str = Field(pattern=BLOCK_ID_PATTERN)
    data: Base64 = Field(max_length=(MAX_BLOCK_BYTES * 4) // 3 + 8)


class BatchRequest(Strict):
    operations: list[BatchCreate | BatchUpdate | BatchDelete] = Field(
        min_length=1, max_length=MAX_BATCH_OPERATIONS,
        description="Applied in order in one transaction; each succeeds or fails alone.")
    blocks: list[BlockData] = Field(
        default_factory=list, max_length=MAX_BATCH_BLOCKS,
        description="API 1.1: small blocks (each up to 64 KiB) that the operations list, "
                    "stored before they run, so a file whose blocks are all here is "
                    "`uploaded` at once: one request and one change instead of a create, "
                    "a POST /blocks and two changes.")


class BatchResult(BaseModel):
    ok: bool
    result: NodeWrite | None = None
    error: ErrorInfo | None = None


class FeedSpan(BaseModel):
    """API 1.1: where the caller's changes feed stood just before and just after a
    request's one transaction, and how many changes it added there. Nothing else can come
    in between, so a client whose cursor was `before` and that took in every change this
    request made (as many as `added`) may move its cursor to `after` without pulling them
    back."""

    before: int
    after: int
    added: int


class BatchResponse(BaseModel):
    results: list[BatchResult]
    feed: FeedSpan | None = None


class BlockBatch(Strict):
    blocks: list[BlockData] = Field(min_length=1, max_length=MAX_BATCH_BLOCKS)


class BlockReadRequest(Strict):
    ids: list[str] = Field(min_length=1, max_length=MAX_BATCH_BLOCKS)


class BlockRead(BaseModel):
    id: str
    data: Base64 | None = None
    error: ErrorInfo | None = None


class BlockReadResult(BaseModel):
    blocks: list[BlockRead]


class BlockStored(BaseModel):
    block_id: str
    ok: bool
    completed_nodes: list[str] = Field(default_factory=list,
                                       description="Nodes this block made `uploaded`.")
    error: ErrorInfo | None = None


class BlockBatchResult(BaseModel):
    results: list[BlockStored]


# --- the appliance -------------------------------------------------------------------------

class DiskCounts(BaseModel):
    ok: int
    total: int


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    appliance_id: str
    version: str
    api_version: str
    disks: DiskCounts


class DiskInfo(BaseModel):
    name: str
    path: str
    state: str
    shard_count: int | None
    free_bytes: int | None
    total_bytes: int | None
    recent_errors: int = 0
    detail: str = ""
