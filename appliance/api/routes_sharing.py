"""Sharing a node (and, for a folder, its subtree) with other users, read-only."""

from __future__ import annotations

import apsw
from fastapi import APIRouter, Response

from appliance.api.context import CallerDep, ContextDep
from appliance.api.convert import decode_b64, grant_out, node_out
from appliance.meta import sharing, tree
from protocol.models import (
    Grants,
    SharedItem,
    SharedWithMe,
    ShareRequest,
)

router = APIRouter(tags=["sharing"])


@router.post("/files/{node_id}/share", response_model=Grants)
async def share(node_id: str, body: ShareRequest, caller: CallerDep,
                context: ContextDep) -> Grants:
    """Grant users read access: for each, the node key wrapped for their public key
    (GET /users/{name}/public-key). Sharing again replaces the wrapped key."""
    grants = [(grant.user, decode_b64(grant.wrapped_key, "wrapped_key"))
              for grant in body.grants]
    result = await context.change(caller.device.id, lambda db, journal: sharing.share(
        db, caller.user, journal, tree.check_node_id(node_id), grants))
    return Grants(grants=[grant_out(g) for g in result])


@router.get("/files/{node_id}/shares", response_model=Grants)
async def list_shares(node_id: str, caller: CallerDep, context: ContextDep) -> Grants:
    """Who the caller's node is shared with."""
    def read(db: apsw.Connection) -> Grants:
        node = tree.owned_node(db, caller.user.id, node_id)
        return Grants(grants=[grant_out(g) for g in sharing.grants_of(db, node.id)])
    return await context.meta.read(read)


@router.delete("/files/{node_id}/share/{user}", status_code=204, response_class=Response)
async def unshare(node_id: str, user: str, caller: CallerDep, context: ContextDep) -> Response:
    """Revoke a user's grant: from now on they cannot list the node or get URLs for it."""
    await context.change(caller.device.id, lambda db, journal: sharing.unshare(
        db, caller.user, journal, tree.check_node_id(node_id), user))
    return Response(status_code=204)


@router.get("/shared-with-me", response_model=SharedWithMe)
async def shared_with_me(caller: CallerDep, context: ContextDep) -> SharedWithMe:
    """Nodes other users shared with the caller, with each grant's wrapped key."""
    items = await context.meta.read(lambda db: sharing.shared_with(db, caller.user.id))
    return SharedWithMe(items=[
        SharedItem(node=node_out(node), owner=node.owner_name,
                   wrapped_key=grant_out(grant).wrapped_key, granted_at=grant.granted_at)
        for node, grant in items])
