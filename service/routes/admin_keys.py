"""API keys: operators create, list and revoke them."""
from fastapi import APIRouter

from schemas import store
from schemas.records import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ListPublic
from service.deps import ConnDep, OperatorKey
from service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/admin/keys", tags=["admin"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=ApiKeyCreated)
async def create_key(body: ApiKeyCreate, conn: ConnDep, operator: OperatorKey) -> ApiKeyCreated:
    """Create a key; the secret is in this response only."""
    async with conn.transaction():
        return await store.create_api_key(conn, name=body.name, role=body.role,
                                          rate_limit=body.rate_limit)


@router.get("", response_model=ListPublic[ApiKeyPublic])
async def list_keys(conn: ConnDep, operator: OperatorKey) -> ListPublic[ApiKeyPublic]:
    keys = await store.list_api_keys(conn)
    return ListPublic(data=keys, count=len(keys))


@router.delete("/{key_id}", response_model=ApiKeyPublic)
async def revoke_key(key_id: int, conn: ConnDep, operator: OperatorKey) -> ApiKeyPublic:
    """Revoke a key: it stops working at once; its history stays."""
    async with conn.transaction():
        return await store.revoke_api_key(conn, id=key_id)
