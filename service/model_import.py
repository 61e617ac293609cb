"""Bring your own model into the registry: `feedloop models import DIR`, `POST
/v1/admin/models/import` and `FEEDLOOP_POLICY_PATH` pointing at a plain Hugging Face directory all
come here. The checkpoint is made by `lm.importing` (blocking: in a thread), then registered in
one transaction; a refused import registers nothing."""
import asyncio
from pathlib import Path

from lm.importing import import_model, imports_dir
from schemas.checkpoint import MANIFEST
from schemas.records import ModelVersion
from schemas.settings import Settings
from store import registry


async def import_policy(conn, settings: Settings, *, path: str | Path, actor: str,
                        reason: str | None = None) -> ModelVersion:
    """The causal LM at `path` imported into the data directory and registered as a candidate
    policy (NotAChatModel, a 400, saying what is missing otherwise)."""
    final, manifest = await asyncio.to_thread(import_model, path, imports_dir(settings.checkpoint_dir))
    async with conn.transaction():
        return await registry.register_checkpoint(
            conn, path=final, kind="policy", status="candidate", actor=actor,
            reason=reason or f"imported from {manifest['config'].get('imported_from', path)}")


def policy_checkpoint(settings: Settings) -> Path:
    """FEEDLOOP_POLICY_PATH as a checkpoint: as it is when it is one of ours (it has a manifest),
    else imported into the data directory first (blocking)."""
    path = Path(settings.policy_path)
    if (path / MANIFEST).exists():
        return path
    return import_model(path, imports_dir(settings.checkpoint_dir))[0]
