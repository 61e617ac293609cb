"""API keys: only a key's hash is stored; the secret is shown once, when it is created."""
import hashlib
import secrets

from schemas.errors import NotFound
from schemas.records import ApiKeyCreated, ApiKeyPublic
from store.sql import fetch_all, fetch_one


def hash_key(key: str) -> str:
    # Keys are 32 random bytes: a plain digest is enough, no slow password hash needed.
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return "fl-" + secrets.token_urlsafe(32)


async def create_api_key(conn, *, name: str, role: str, rate_limit: int | None = None,
                         key: str | None = None) -> ApiKeyCreated | None:
    """A new key (random unless given); None when the given key exists already."""
    key = key or new_api_key()
    row = await fetch_one(conn, "insert_api_key", key_hash=hash_key(key), prefix=key[:7], name=name,
                          role=role, rate_limit=rate_limit)
    return ApiKeyCreated(**row, key=key) if row else None


async def get_api_key(conn, *, key: str) -> ApiKeyPublic | None:
    row = await fetch_one(conn, "get_api_key_by_hash", key_hash=hash_key(key))
    return ApiKeyPublic(**row) if row else None


async def take_rate_limited_request(conn, *, key_id: int, rate_limit: int) -> bool:
    """Count one request against the key's per-minute limit; False when this minute's is used up."""
    return await fetch_one(conn, "take_rate_limited_request", key_id=key_id, rate_limit=rate_limit) is not None


async def list_api_keys(conn) -> list[ApiKeyPublic]:
    return [ApiKeyPublic(**r) for r in await fetch_all(conn, "list_api_keys")]


async def revoke_api_key(conn, *, id: int) -> ApiKeyPublic:
    row = await fetch_one(conn, "revoke_api_key", id=id)
    if row is None:
        raise NotFound(f"no live API key with id {id}")
    return ApiKeyPublic(**row)


async def count_live_operator_keys(conn) -> int:
    return (await fetch_one(conn, "count_live_operator_keys"))["n"]
