"""The FastAPI application: lifespan (database, migrations, serving engines), routers, errors."""
import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool

from schemas.settings import Settings, get_settings
from service import errors
from service.middleware import RequestGuard
from service.recording import Recorder
from service.routes import (admin_data, admin_exchanges, admin_keys, admin_models, admin_training, chat,
                            feedback, health)
from service.serving import Serving, follow_registry, settle_heap, sync_with_registry
from store import keys
from store.db import database_url, migrate
from store.registry import ensure_initial_policy

log = logging.getLogger(__name__)


async def ensure_init_key(pool: AsyncConnectionPool, settings: Settings) -> None:
    """FEEDLOOP_INIT_API_KEY: an operator key with that value, so scripts can drive a fresh deployment."""
    if not settings.init_api_key:
        return
    async with pool.connection() as conn, conn.transaction():
        if await keys.create_api_key(conn, name="init", role="operator", key=settings.init_api_key):
            log.info("created the operator key from FEEDLOOP_INIT_API_KEY")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    if settings.torch_threads:
        import torch
        torch.set_num_threads(settings.torch_threads)
    url = await asyncio.to_thread(database_url, settings)
    await asyncio.to_thread(migrate, url)
    # No per-borrow check: it costs a round trip on every request; a broken connection is
    # discarded by the pool when it is returned in a bad state.
    pool = AsyncConnectionPool(url, open=False, min_size=2, max_size=16, kwargs={"autocommit": True})
    await pool.open(wait=True, timeout=30)
    serving = Serving(settings)
    app.state.pool, app.state.serving, app.state.recorder = pool, serving, Recorder(pool)
    await ensure_init_key(pool, settings)
    if settings.policy_path:
        async with pool.connection() as conn:
            await ensure_initial_policy(conn, path=settings.policy_path, actor="FEEDLOOP_POLICY_PATH")
    await sync_with_registry(pool, serving)  # ready when start-up completes, if a policy exists
    if not serving.ready:
        log.warning("no active policy yet: /ready answers 503 until one is registered")
    await asyncio.to_thread(settle_heap)
    follower = asyncio.create_task(follow_registry(pool, serving))
    try:
        yield
    finally:
        follower.cancel()
        await app.state.recorder.wait()
        await serving.close()
        await pool.close()


def create_app() -> FastAPI:
    app = FastAPI(title="feedloop", version="0.1.0", lifespan=lifespan,
                  description="A chat model that learns from the people who use it.")
    errors.install(app)
    for module in (chat, feedback, admin_keys, admin_exchanges, admin_data, admin_models, admin_training,
                   health):
        app.include_router(module.router)
    app.add_middleware(RequestGuard, max_body_bytes=get_settings().max_body_bytes)
    return app


app = create_app()
