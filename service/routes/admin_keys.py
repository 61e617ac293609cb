"""API keys: operators create, list and revoke them."""
from fastapi import APIRouter, Query

from schemas.records import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ListPublic
from service.deps import OPERATORS_ONLY, ConnDep
from service.errors import ERROR_RESPONSES
from store import keys

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], responses=ERROR_RESPONSES,
                   dependencies=OPERATORS_ONLY)


@router.post("", status_code=201, response_model=ApiKeyCreated)
async def create_key(body: ApiKeyCreate, conn: ConnDep) -> ApiKeyCreated:
    """Create a key; the secret is in this response only."""
    async with conn.transaction():
        return await keys.create_api_key(conn, name=body.name, role=body.role,
                                         rate_limit=body.rate_limit)


@router.get("", response_model=ListPublic[ApiKeyPublic])
async def list_keys(conn: ConnDep,
                    limit: int = Query(100, ge=1, le=1000, description="keys on this page"),
                    before: int | None = Query(None, ge=1, description="the page after the one that ended "
                                                                        "with this id (the last `id` seen)")
                    ) -> ListPublic[ApiKeyPublic]:
    """Keys newest first, a page at a time: pass the last id of a page as `before` for the next
    while `has_more`."""
    found = await keys.list_api_keys(conn, limit=limit + 1, before=before)
    return ListPublic(data=found[:limit], count=len(found[:limit]), has_more=len(found) > limit)


@router.delete("/{key_id}", response_model=ApiKeyPublic, responses={409: ERROR_RESPONSES[400]})
async def revoke_key(key_id: int, conn: ConnDep) -> ApiKeyPublic:
    """Revoke a key: it stops working at once; its history stays. The last live operator key
    cannot be revoked (409)."""
    return await keys.revoke_api_key(conn, id=key_id)
