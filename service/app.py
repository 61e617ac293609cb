"""The FastAPI application: lifespan (database, migrations, serving engines), routers, errors, and
the console's static files."""
import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from schemas.checkpoint import BadCheckpoint
from schemas.settings import Settings, get_settings
from service import errors
from lm.importing import NotAChatModel
from service.auth import Keys
from service.feedback_writer import FeedbackWriter
from service.middleware import Admission, RequestGuard, TrailingSlash
from service.recording import Recorder, Spool
from service.routes import (admin_data, admin_exchanges, admin_keys, admin_models, admin_training, chat,
                            console, feedback, health, me)
from service.model_import import policy_checkpoint
from service.serving import Serving, follow_registry, replace_lost_engines, settle_heap, sync_with_registry
from store import keys
from store.db import Database, database_url, migrate
from store.registry import ensure_initial_policy

log = logging.getLogger(__name__)


async def ensure_init_key(db: Database, settings: Settings) -> None:
    """FEEDLOOP_INIT_API_KEY: an operator key with that value, so scripts can drive a fresh
    deployment. A key with that value that an operator revoked stays revoked: a restart must not
    bring back a key someone took out of service (a leaked one, say)."""
    if not settings.init_api_key:
        return
    async with db.connection() as conn, conn.transaction():
        if await keys.create_api_key(conn, name="init", role="operator", key=settings.init_api_key):
            log.info("created the operator key from FEEDLOOP_INIT_API_KEY")
        elif await keys.get_api_key(conn, key=settings.init_api_key) is None:
            log.warning("FEEDLOOP_INIT_API_KEY names a key that was revoked; it stays revoked")


async def ensure_policy_path(db: Database, settings: Settings) -> None:
    """FEEDLOOP_POLICY_PATH: registered as the first policy when none is active. A checkpoint
    there that fails its hash is reported and skipped: the server starts and says it is not
    ready (and falls back to an earlier version when there is one) instead of crashing."""
    try:
        path = await asyncio.to_thread(policy_checkpoint, settings)  # a plain HF directory is imported
        async with db.connection() as conn:
            await ensure_initial_policy(conn, path=path, actor="FEEDLOOP_POLICY_PATH")
    except BadCheckpoint as e:
        log.error("FEEDLOOP_POLICY_PATH is not an intact checkpoint, not registered: %s", e)
    except NotAChatModel as e:
        log.error("FEEDLOOP_POLICY_PATH cannot be imported, not registered: %s", e)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    if settings.torch_threads:
        import torch
        torch.set_num_threads(settings.torch_threads)
    url = await asyncio.to_thread(database_url, settings)
    await asyncio.to_thread(migrate, url)
    db = Database(url, min_size=2, max_size=16)
    await db.open(timeout=30)
    serving = Serving(settings)
    recorder = Recorder(db, await asyncio.to_thread(Spool, settings.spool_dir, settings.spool_max_exchanges))
    app.state.database, app.state.serving, app.state.recorder = db, serving, recorder
    app.state.keys, app.state.feedback_writer = Keys(db), FeedbackWriter(db)
    await ensure_init_key(db, settings)
    if settings.policy_path:
        await ensure_policy_path(db, settings)
    await sync_with_registry(db, serving)  # ready when start-up completes, if a policy exists
    if not serving.ready:
        log.warning("no active policy yet: /ready answers 503 until one is registered")
    await recorder.drain_spool()  # what a previous run answered while the database was away
    recorder.start()
    await asyncio.to_thread(settle_heap)
    followers = [asyncio.create_task(follow_registry(db, serving)),
                 asyncio.create_task(replace_lost_engines(db, serving))]
    try:
        yield
    finally:
        for task in followers:
            task.cancel()
        await recorder.wait()
        await serving.close()
        await db.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(title="feedloop", version="0.1.0", lifespan=lifespan,
                  description="A chat model that learns from the people who use it.")
    app.state.settings = settings
    errors.install(app)
    for module in (chat, feedback, me, admin_keys, admin_exchanges, admin_data, admin_models, admin_training,
                   health, console):
        app.include_router(module.router)
    app.mount("/console", console.assets, name="console")
    app.add_middleware(Admission, settings=settings,  # inner: keys, then unstorable text
                       direct={("POST", "/v1/feedback"): feedback.give_feedback_directly})
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)  # outer: ids, size, crashes
    app.add_middleware(TrailingSlash)
    if settings.cors_origins:  # outermost: a browser's preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "retry-after"])
    return app


app = create_app()
