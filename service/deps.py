"""What routes need, declared once: the caller's key, a database connection, the serving engines."""
from typing import Annotated, AsyncIterator

from fastapi import Depends, Request
from psycopg import AsyncConnection

from schemas.records import ApiKeyPublic
from schemas.settings import Settings, get_settings
from service.auth import required_role
from service.errors import ApiError
from service.serving import Serving
from store.db import Database


# async, though they await nothing: FastAPI runs a plain `def` dependency in a worker thread, a
# thread hop on every request
async def get_database(request: Request) -> Database:
    return request.app.state.database


async def get_serving(request: Request) -> Serving:
    return request.app.state.serving


DatabaseDep = Annotated[Database, Depends(get_database)]
ServingDep = Annotated[Serving, Depends(get_serving)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def current_key(request: Request) -> ApiKeyPublic:
    """The key `Admission` (service/middleware.py) authenticated before the body was read; a
    route outside the keyed paths that asks for one authenticates here."""
    key = getattr(request.state, "api_key", None)
    if key is None:
        key = await request.app.state.keys.authenticate(
            request.headers.get("authorization"), required_role(request.url.path, request.app.state.settings) or "user")
        request.state.api_key = key
    return key


CurrentKey = Annotated[ApiKeyPublic, Depends(current_key)]


async def get_conn(db: DatabaseDep, key: CurrentKey) -> AsyncIterator[AsyncConnection]:
    # Borrowed only after the key is known, whatever order a route lists its dependencies in:
    # one request never holds two connections (64 clients on a pool of 16 would otherwise
    # deadlock). Autocommit: a write is committed where the route's `transaction()` block
    # ends, before the response is built, so a 200 means committed.
    async with db.connection() as conn:
        yield conn


ConnDep = Annotated[AsyncConnection, Depends(get_conn)]


async def operator_key(key: CurrentKey) -> ApiKeyPublic:
    if key.role != "operator":
        raise ApiError(403, "This route needs an operator key.", code="operator_only")
    return key


OperatorKey = Annotated[ApiKeyPublic, Depends(operator_key)]
# On an admin router: every route behind it needs an operator key, whether or not it reads it.
OPERATORS_ONLY = [Depends(operator_key)]
