"""What routes need, declared once: the caller's key, a database connection, the serving engines."""
import time
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from schemas.records import ApiKeyPublic
from schemas.settings import Settings, get_settings
from service.errors import ApiError
from service.serving import Serving
from store import keys


def get_pool(request: Request) -> AsyncConnectionPool:
    return request.app.state.pool


def get_serving(request: Request) -> Serving:
    return request.app.state.serving


PoolDep = Annotated[AsyncConnectionPool, Depends(get_pool)]
ServingDep = Annotated[Serving, Depends(get_serving)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def current_key(request: Request, pool: PoolDep) -> ApiKeyPublic:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="missing_api_key")
    # A short borrow of its own: a streamed chat must not hold a pool connection while it runs.
    async with pool.connection() as conn:
        key = await keys.get_api_key(conn, key=token.strip())
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if key.rate_limit and not await keys.take_rate_limited_request(conn, key_id=key.id,
                                                                         rate_limit=key.rate_limit):
            # The windows are the database's calendar minutes; this replica's clock says when
            # the next one opens (equal up to clock skew).
            raise ApiError(429, f"Rate limit reached: {key.rate_limit} requests per minute for this key.",
                           code="rate_limit_exceeded", headers={"Retry-After": str(60 - time.gmtime().tm_sec)})
    request.state.api_key = key
    return key


CurrentKey = Annotated[ApiKeyPublic, Depends(current_key)]


async def get_conn(pool: PoolDep, key: CurrentKey) -> AsyncIterator[AsyncConnection]:
    # Borrowed only after the key's own borrow is returned, whatever order a route lists its
    # dependencies in: one request never holds two connections (64 clients on a pool of 16
    # would otherwise deadlock). Autocommit: a write is committed where the route's
    # `transaction()` block ends, before the response is built, so a 200 means committed.
    async with pool.connection() as conn:
        yield conn


ConnDep = Annotated[AsyncConnection, Depends(get_conn)]


async def operator_key(key: CurrentKey) -> ApiKeyPublic:
    if key.role != "operator":
        raise ApiError(403, "This route needs an operator key.", code="operator_only")
    return key


OperatorKey = Annotated[ApiKeyPublic, Depends(operator_key)]
# On an admin router: every route behind it needs an operator key, whether or not it reads it.
OPERATORS_ONLY = [Depends(operator_key)]
