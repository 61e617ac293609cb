"""API keys: operators create, list and revoke them."""
from fastapi import APIRouter

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
async def list_keys(conn: ConnDep) -> ListPublic[ApiKeyPublic]:
    found = await keys.list_api_keys(conn)
    return ListPublic(data=found, count=len(found))


@router.delete("/{key_id}", response_model=ApiKeyPublic)
async def revoke_key(key_id: int, conn: ConnDep) -> ApiKeyPublic:
    """Revoke a key: it stops working at once; its history stays."""
    async with conn.transaction():
        return await keys.revoke_api_key(conn, id=key_id)
