"""API keys: only a key's hash is stored; the secret is shown once, when it is created."""
import hashlib
import secrets

from schemas.errors import Conflict, NotFound
from schemas.records import ApiKeyCreated, ApiKeyPublic
from store import locks
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


async def get_api_keys(conn, *, keys: list[str]) -> dict[str, ApiKeyPublic]:
    """The live ones among `keys`, by key: what `get_api_key` answers for each, in one query."""
    by_hash = {hash_key(k): k for k in keys}
    rows = await fetch_all(conn, "get_api_keys_by_hashes", key_hashes=list(by_hash))
    return {by_hash[r.pop("key_hash")]: ApiKeyPublic(**r) for r in rows}


async def take_rate_limited_request(conn, *, key_id: int, rate_limit: int) -> bool:
    """Count one request against the key's per-minute limit; False when this minute's is used up."""
    return await fetch_one(conn, "take_rate_limited_request", key_id=key_id, rate_limit=rate_limit) is not None


async def list_api_keys(conn, *, limit: int | None = None, before: int | None = None) -> list[ApiKeyPublic]:
    """Keys newest first: `limit` of them with ids below `before` (all of them by default)."""
    return [ApiKeyPublic(**r) for r in await fetch_all(conn, "list_api_keys", limit=limit, before=before)]


async def revoke_api_key(conn, *, id: int) -> ApiKeyPublic:
    """Revoke a live key; never the last live operator key (nobody could run the system then).
    Revocations are serialised, so two operators revoking each other's key cannot both win."""
    async with conn.transaction():
        await locks.lock_for_transaction(conn, locks.KEYS)
        row = await fetch_one(conn, "get_live_api_key", id=id)
        if row is None:
            raise NotFound(f"no live API key with id {id}")
        if row["role"] == "operator" and await count_live_operator_keys(conn) <= 1:
            raise Conflict(f"key {id} is the last live operator key; create another operator key "
                           "before revoking it", code="last_operator_key")
        return ApiKeyPublic(**await fetch_one(conn, "revoke_api_key", id=id))


async def count_live_operator_keys(conn) -> int:
    return (await fetch_one(conn, "count_live_operator_keys"))["n"]


async def external_author(conn, *, source: str, person: str, name: str) -> int:
    """The key id that feedback imported from `source` (e.g. 'openwebui') is attributed to, one per
    `person` there (their id in it), named `name`; made the first time. It can never authenticate."""
    row = await fetch_one(conn, "ensure_external_author", key_hash=f"{source}:{person}", name=name)
    return row["id"]
