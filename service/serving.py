"""Which engine answers a request, and how engines change without failing one.

The registry is the truth: every replica follows it (LISTEN/NOTIFY, polling as the fallback).
A new active version is loaded and warmed beside the old engine, then one assignment switches
new requests to it; requests already submitted finish on the old engine (and are recorded with
its version, which they hold), and only then is the old engine closed. A version that fails to
load or warm is marked `failed` and serving stays where it was. A version served by an inference
server is warmed by the target check (service/targets.py); when only its target changes (an
operator's retarget), a fresh engine on the new target replaces the old one the same way, and one
that cannot be warmed leaves the old target serving (the version itself is not at fault). An
engine whose process died is lost: its requests in flight fail (503, retryable), and a fresh
engine of the same version is loaded at once, as a swap would load it."""
import asyncio
import gc
import logging
import random
import socket

import psycopg
from psycopg import AsyncConnection

from lm.device import resolve_device
from schemas.errors import DomainError
from schemas.records import ModelVersion
from schemas.settings import Settings
from service.engine import Engine
from service.targets import TargetRefused, target_of
from store import locks, registry
from store.db import Database

log = logging.getLogger(__name__)
REPLICA = f"replica {socket.gethostname()}"


def build_engine(version: ModelVersion, settings: Settings) -> Engine:
    """Load (blocking) the engine that serves `version`, warmed up."""
    target = target_of(version, settings)
    if target is not None:
        from service.remote_engine import RemoteEngine
        engine = RemoteEngine(version, target=target, api_key=settings.remote_api_key,
                              check_timeout=settings.target_timeout_seconds)
    else:
        from schemas.checkpoint import BadCheckpoint, read_manifest
        # refuse files that no longer match what was registered (the manifest included)
        if read_manifest(version.path)["content_hash"] != version.content_hash:
            raise BadCheckpoint(f"{version.path}: the manifest's content hash is not the registered one")
        options = dict(device=resolve_device(settings.device), max_batch_rows=settings.max_batch_rows,
                       max_queue=settings.max_queue, queue_timeout=settings.queue_timeout_seconds)
        if settings.engine_process:
            from service.engine_process import ProcessEngine
            engine = ProcessEngine(version, torch_threads=settings.torch_threads, **options)
        else:
            from service.local_engine import LocalEngine
            engine = LocalEngine(version, **options)
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
        self.syncing = asyncio.Lock()  # one sync with the registry at a time
        self.engine_lost = asyncio.Event()  # an engine's process died: sync now, not at the next poll

    @property
    def ready(self) -> bool:
        return self.active is not None and not self.active.lost

    def engines(self) -> list[Engine]:
        return [e for e in [self.active, *self.canaries.values()] if e is not None]

    def serves(self, engine: Engine | None, version: ModelVersion) -> bool:
        """`engine` is `version`'s, on the target the registry names for it now."""
        if engine is None or engine.lost or engine.version.id != version.id:
            return False
        try:
            wanted = target_of(version, self.settings)
        except TargetRefused:
            wanted = None
        return getattr(engine, "target", None) == wanted

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
        engine = await asyncio.to_thread(build_engine, version, self.settings)
        loop = asyncio.get_running_loop()
        engine.on_lost = lambda: loop.call_soon_threadsafe(self.engine_lost.set)
        return engine

    async def set_active(self, version: ModelVersion) -> None:
        """Switch to `version` (a loaded canary is taken over as it is, when on the same target);
        raises if it cannot load."""
        stale = None
        if self.serves(self.canaries.get(version.id), version):
            engine = self.canaries.pop(version.id)
        else:
            engine = await self._load(version)
            stale = self.canaries.pop(version.id, None)  # a canary of it on another target
        engine.version = version
        old, self.active = self.active, engine  # the switch: new requests go to `engine` now
        log.info("serving %s (was %s) on %s", version.name, old.version.name if old else "nothing",
                 getattr(engine, "target", "this replica"))
        for done in (old, stale):
            if done is not None:
                await asyncio.to_thread(done.close)  # finishes what was submitted to it, then frees it
        if old is not None:
            await asyncio.to_thread(settle_heap)

    async def set_canaries(self, versions: list[ModelVersion]) -> list[tuple[ModelVersion, Exception]]:
        """Serve exactly these canaries; returns the ones that failed to load."""
        failed = []
        wanted = {v.id: v for v in versions}
        for vid in [v for v in self.canaries if v not in wanted]:
            await asyncio.to_thread(self.canaries.pop(vid).close)
            await asyncio.to_thread(settle_heap)
        for v in versions:
            current = self.canaries.get(v.id)
            if current is not None and self.serves(current, v):
                current.version = v  # fraction may have changed
                continue
            try:
                self.canaries[v.id] = await self._load(v)
            except Exception as e:
                if current is None or current.lost:  # nothing of it serves: the version failed
                    failed.append((v, e))
                else:  # a new target that cannot serve it: the old one goes on
                    log.error("%s cannot be served on its new target; it stays on %s: %s",
                              v.name, getattr(current, "target", "this replica"), e)
                continue
            if current is not None:
                await asyncio.to_thread(current.close)  # its requests finish on the old target
        return failed

    async def close(self) -> None:
        for engine in self.engines():
            await asyncio.to_thread(engine.close)
        self.active, self.canaries = None, {}


async def sync_with_registry(pool: Database, serving: Serving) -> None:
    """Bring this replica to what the registry says serves; mark what cannot load as failed."""
    async with serving.syncing:
        await _sync(pool, serving)


async def _sync(pool: Database, serving: Serving) -> None:
    async with pool.connection() as conn:
        versions = await registry.list_serving_versions(conn)
    active = next((v for v in versions if v.status == "active"), None)
    failures = await serving.set_canaries([v for v in versions if v.status == "canary"])
    if active and not serving.serves(serving.active, active):
        retargeted = serving.ready and serving.active.version.id == active.id
        try:
            await serving.set_active(active)
        except Exception as e:
            if not retargeted:
                failures.append((active, e))
            else:  # a new target that cannot serve it: the old one goes on
                log.error("%s cannot be served on its new target; it stays on %s: %s",
                          active.name, getattr(serving.active, "target", "this replica"), e)
    serving_now = serving.active if serving.ready else None  # a lost engine serves nothing
    for version, error in failures:
        log.error("%s failed to load; serving stays on %s: %s", version.name,
                  serving_now.version.name if serving_now else "nothing", error)
        async with pool.connection() as conn:
            await registry.mark_failed(conn, id=version.id, actor=REPLICA, reason=f"load failed: {error}",
                                       restore=serving_now.version.id if serving_now else None)
    if serving_now is None and (failures or active is None):
        await fall_back(pool, serving, failed=failures[-1][0] if failures else None)


async def fall_back(pool, serving: Serving, *, failed: ModelVersion | None) -> None:
    """Nothing serves (the active version failed to load, or there is none): the most recently
    active version that still loads takes over, audited as a rollback; failing that, the
    checkpoint at FEEDLOOP_POLICY_PATH. A candidate that does not load is marked failed too."""
    async with pool.connection() as conn:
        candidates = await registry.fallback_candidates(conn, kind="policy")
    why = f"{failed.name} failed to load" if failed else "no active policy"
    for version in candidates:
        try:
            await serving.set_active(version)
        except Exception as e:
            log.error("fallback %s does not load either: %s", version.name, e)
            async with pool.connection() as conn:
                await registry.mark_failed(conn, id=version.id, actor=REPLICA, reason=f"load failed: {e}")
            continue
        async with pool.connection() as conn:
            await registry.fall_back(conn, id=version.id, actor=REPLICA, reason=f"{why}: falling back to {version.name}")
        log.warning("%s: serving %s, the most recent version that served before", why, version.name)
        return
    if serving.settings.policy_path:
        from schemas.checkpoint import BadCheckpoint, read_manifest
        from service.model_import import policy_checkpoint
        try:
            path = await asyncio.to_thread(policy_checkpoint, serving.settings)  # imported when a plain HF dir
            await asyncio.to_thread(read_manifest, path)  # hashed off the event loop
            async with pool.connection() as conn:
                version = await registry.ensure_initial_policy(conn, path=path, actor="FEEDLOOP_POLICY_PATH")
            await serving.set_active(version)
        except BadCheckpoint as e:
            log.error("%s, and FEEDLOOP_POLICY_PATH is not intact either: %s", why, e)
        except Exception as e:
            log.error("%s, and FEEDLOOP_POLICY_PATH does not load either: %s", why, e)


async def replace_lost_engines(pool: Database, serving: Serving) -> None:
    """Sync as soon as an engine is lost (the registry follower would at its next poll)."""
    while True:
        await serving.engine_lost.wait()
        serving.engine_lost.clear()
        try:
            await sync_with_registry(pool, serving)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the follower retries at its next poll
            log.warning("could not replace a lost engine now (%s); the registry follower will", e)


async def follow_registry(pool: Database, serving: Serving) -> None:
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
        except (psycopg.OperationalError, DomainError) as e:  # the database is away: no traceback each poll
            log.warning("registry follower lost its connection (%s); retrying", e)
        except Exception:
            log.exception("registry follower lost its connection; retrying")
        await asyncio.sleep(serving.settings.poll_seconds)
