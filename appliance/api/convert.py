"""From the metadata's records to the API's bodies (protocol.models), and base64 fields to
bytes with the appliance's error for a bad one."""

from __future__ import annotations

from appliance.errors import BadRequestError
from appliance.meta.records import Change, Grant, Node
from protocol.ids import b64decode, b64encode
from protocol.models import ChangeOut, GrantOut, NodeOut


def decode_b64(value: str, field: str) -> bytes:
    try:
        return b64decode(value)
    except ValueError:
        raise BadRequestError(f"{field} is not valid base64") from None


def node_out(node: Node) -> NodeOut:
    return NodeOut(
        id=node.id, owner=node.owner_name, parent=node.parent_id, kind=node.kind,
        version=node.version, status=node.status, deleted=node.deleted,
        deleted_at=node.deleted_at, size=node.size, block_count=node.block_count,
        metadata=b64encode(node.metadata), wrapped_key=b64encode(node.wrapped_key),
        created_at=node.created_at, updated_at=node.updated_at, updated_by=node.updated_by)


def change_out(change: Change, node: Node | None = None) -> ChangeOut:
    return ChangeOut(cursor=change.cursor, node_id=change.node_id, version=change.version,
                     kind=change.kind, at=change.at, device_id=change.device_id,
                     node=None if node is None else node_out(node))


def grant_out(grant: Grant) -> GrantOut:
    return GrantOut(user=grant.user_name, node_id=grant.node_id,
                    wrapped_key=b64encode(grant.wrapped_key), granted_at=grant.granted_at)
