"""Which engine answers a request, and how engines change without failing one.

The registry is the truth: every replica follows it (LISTEN/NOTIFY, polling as the fallback).
A new active version is loaded and warmed beside the old engine, then one assignment switches
new requests to it; requests already submitted finish on the old engine (and are recorded with
its version, which they hold), and only then is the old engine closed. A version that fails to
load or warm is marked `failed` and serving stays where it was."""
import asyncio
import gc
import logging
import random
import socket

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from lm.device import resolve_device
from schemas.records import ModelVersion
from schemas.settings import Settings
from service.engine import Engine
from store import locks, registry

log = logging.getLogger(__name__)
REPLICA = f"replica {socket.gethostname()}"


def build_engine(version: ModelVersion, settings: Settings) -> Engine:
    """Load (blocking) the engine that serves `version`, warmed up."""
    if settings.engine == "remote" or version.endpoint:
        from service.remote_engine import RemoteEngine
        engine = RemoteEngine(version, url=version.endpoint or settings.remote_url,
                              model=settings.remote_model, api_key=settings.remote_api_key)
    else:
        from schemas.checkpoint import read_manifest
        from service.local_engine import LocalEngine
        read_manifest(version.path)  # refuse files that no longer match what was registered
        engine = LocalEngine(version, device=resolve_device(settings.device),
                             max_batch_rows=settings.max_batch_rows, max_queue=settings.max_queue,
                             queue_timeout=settings.queue_timeout_seconds)
    engine.warm()
    return engine


def settle_heap() -> None:
    """Collect once, then freeze what survives (torch, transformers, the models served: half a
    million objects) out of the collector's reach. Left in it, every full collection scans them
    with the GIL held, stopping the engine and every request for a quarter of a second, the
    worst of the time to first token. Run at start-up and after an engine is freed (so a freed
    model in a reference cycle is still collected); each run is such a pause, once."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Serving:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.active: Engine | None = None
        self.canaries: dict[int, Engine] = {}

    @property
    def ready(self) -> bool:
        return self.active is not None

    def engines(self) -> list[Engine]:
        return [e for e in [self.active, *self.canaries.values()] if e is not None]

    def pick(self, model: str) -> Engine | None:
        """The engine for a request naming `model`: the served name routes to the active
        version (or a canary, by its fraction); a version name (`v3`) pins that version."""
        if model == self.settings.model_name:
            draw = random.random()
            for engine in self.canaries.values():
                draw -= engine.version.canary_fraction or 0.0
                if draw < 0:
                    return engine
            return self.active
        return next((e for e in self.engines() if e.version.name == model), None)

    async def _load(self, version: ModelVersion) -> Engine:
        return await asyncio.to_thread(build_engine, version, self.settings)

    async def set_active(self, version: ModelVersion) -> None:
        """Switch to `version` (a loaded canary is taken over as it is); raises if it cannot load."""
        engine = self.canaries.pop(version.id, None) or await self._load(version)
        engine.version = version
        old, self.active = self.active, engine  # the switch: new requests go to `engine` now
        log.info("serving %s (was %s)", version.name, old.version.name if old else "nothing")
        if old is not None:
            await asyncio.to_thread(old.close)  # finishes what was submitted to it, then frees it
            await asyncio.to_thread(settle_heap)

    async def set_canaries(self, versions: list[ModelVersion]) -> list[tuple[ModelVersion, Exception]]:
        """Serve exactly these canaries; returns the ones that failed to load."""
        failed = []
        wanted = {v.id: v for v in versions}
        for vid in [v for v in self.canaries if v not in wanted]:
            await asyncio.to_thread(self.canaries.pop(vid).close)
            await asyncio.to_thread(settle_heap)
        for v in versions:
            if v.id in self.canaries:
                self.canaries[v.id].version = v  # fraction may have changed
                continue
            try:
                self.canaries[v.id] = await self._load(v)
            except Exception as e:
                failed.append((v, e))
        return failed

    async def close(self) -> None:
        for engine in self.engines():
            await asyncio.to_thread(engine.close)
        self.active, self.canaries = None, {}


async def sync_with_registry(pool: AsyncConnectionPool, serving: Serving) -> None:
    """Bring this replica to what the registry says serves; mark what cannot load as failed."""
    async with pool.connection() as conn:
        versions = await registry.list_serving_versions(conn)
    active = next((v for v in versions if v.status == "active"), None)
    failures = await serving.set_canaries([v for v in versions if v.status == "canary"])
    if active and (serving.active is None or serving.active.version.id != active.id):
        try:
            await serving.set_active(active)
        except Exception as e:
            failures.append((active, e))
    for version, error in failures:
        log.error("%s failed to load; serving stays on %s: %s", version.name,
                  serving.active.version.name if serving.active else "nothing", error)
        async with pool.connection() as conn:
            await registry.mark_failed(conn, id=version.id, actor=REPLICA, reason=f"load failed: {error}",
                                       restore=serving.active.version.id if serving.active else None)


async def follow_registry(pool: AsyncConnectionPool, serving: Serving) -> None:
    """Sync on every NOTIFY, and every `poll_seconds` in case a notification was missed."""
    while True:
        try:
            async with await AsyncConnection.connect(pool.conninfo, autocommit=True) as listener:
                await locks.listen_registry(listener)
                while True:
                    await sync_with_registry(pool, serving)
                    async for _ in listener.notifies(timeout=serving.settings.poll_seconds, stop_after=1):
                        pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("registry follower lost its connection; retrying")
            await asyncio.sleep(serving.settings.poll_seconds)
