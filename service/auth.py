"""Who may call what, decided before anything else is read: a route's key requirement follows
from its path, so a caller without the right key learns nothing about a request body (a
malformed body from the wrong caller is a 401 or 403, not a 400).

    /v1/admin/...                          an operator key
    /v1/...                                any live key (user or operator)
    /metrics                               an operator key unless FEEDLOOP_OPEN_METRICS (default)
    /docs, /redoc, /openapi.json           any key unless FEEDLOOP_OPEN_DOCS (default)
    /health, /ready, the rest              nobody's key
"""
import time
from typing import Literal

from schemas.records import ApiKeyPublic
from schemas.settings import Settings
from service.coalesce import Coalescer
from service.errors import ApiError
from store import keys
from store.db import Database

Need = Literal["user", "operator"] | None
DOCS = ("/docs", "/redoc", "/openapi.json")


def required_role(path: str, settings: Settings) -> Need:
    if path.startswith("/v1/admin/") or path == "/v1/admin":
        return "operator"
    if path.startswith("/v1/") or path == "/v1":
        return "user"
    if path == "/metrics":
        return None if settings.open_metrics else "operator"
    if path.startswith(DOCS):
        return None if settings.open_docs else "user"
    return None


def bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="missing_api_key")
    return token.strip()


class Keys:
    """The caller's key, looked up on every request: nothing is cached, so a revoked key is refused
    from the moment its revocation commits, on every replica and worker. Concurrent requests'
    lookups share one query (service/coalesce.py): under load the key check costs a query per
    batch of requests, not per request."""

    def __init__(self, db: Database):
        self.db = db
        self._live = Coalescer(self._look_up, lanes=2)

    async def _look_up(self, tokens: list[str]) -> list[ApiKeyPublic | None]:
        # A short borrow of its own (retried once on a connection that broke under it): a streamed
        # chat must not hold a pool connection while it runs.
        found = await self.db.retrying(lambda conn: keys.get_api_keys(conn, keys=tokens))
        return [found.get(t) for t in tokens]

    async def authenticate(self, authorization: str | None, need: Need) -> ApiKeyPublic:
        """The live key in the header, counted against its rate limit; 401, 403 or 429 otherwise."""
        key = await self._live(bearer(authorization))
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        within_limit = not key.rate_limit or await self.db.retrying(
            lambda conn: keys.take_rate_limited_request(conn, key_id=key.id, rate_limit=key.rate_limit))
        if need == "operator" and key.role != "operator":
            raise ApiError(403, "This route needs an operator key.", code="operator_only")
        if not within_limit:
            # The windows are the database's calendar minutes; this replica's clock says when the
            # next one opens (equal up to clock skew).
            raise ApiError(429, f"Rate limit reached: {key.rate_limit} requests per minute for this key.",
                           code="rate_limit_exceeded", headers={"Retry-After": str(60 - time.gmtime().tm_sec)})
        return key
