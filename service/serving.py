"""Which engine answers a request: the active version's, or a canary's for its share of traffic.
Engines are built off the event loop; the choice itself is a dictionary read."""
import asyncio
import logging
import random

from schemas.records import ModelVersion
from schemas.settings import Settings, resolve_device
from service.engine import Engine

log = logging.getLogger(__name__)


def build_engine(version: ModelVersion, settings: Settings) -> Engine:
    """Load (blocking) the engine that serves `version`, warmed up."""
    if settings.engine == "remote" or version.endpoint:
        from service.remote_engine import RemoteEngine
        engine = RemoteEngine(version, url=version.endpoint or settings.remote_url)
    else:
        from service.local_engine import LocalEngine
        engine = LocalEngine(version, device=resolve_device(settings.device),
                             max_batch_rows=settings.max_batch_rows)
    engine.warm()
    return engine


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
            for engine in self.canaries.values():
                if random.random() < (engine.version.canary_fraction or 0.0):
                    return engine
            return self.active
        return next((e for e in self.engines() if e.version.name == model), None)

    async def load_active(self, version: ModelVersion) -> None:
        engine = await asyncio.to_thread(build_engine, version, self.settings)
        old, self.active = self.active, engine
        log.info("serving %s from %s", version.name, version.path)
        if old is not None:
            await asyncio.to_thread(old.close)

    async def close(self) -> None:
        for engine in self.engines():
            await asyncio.to_thread(engine.close)
        self.active, self.canaries = None, {}
