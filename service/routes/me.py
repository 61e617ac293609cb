"""GET /v1/me: the key a request was made with, as its owner may see it (never the secret)."""
from fastapi import APIRouter

from schemas.records import ApiKeyPublic
from service.deps import CurrentKey
from service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1", tags=["keys"], responses=ERROR_RESPONSES)


@router.get("/me", response_model=ApiKeyPublic)
async def me(key: CurrentKey) -> ApiKeyPublic:
    """Who is calling: the key's id, name and role (`user` or `operator`); clients such as the
    console use it to check a key and to show operators their pages."""
    return key
