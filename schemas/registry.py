"""Domain operations on the model registry, shared by the service, the trainer and the CLI."""
from pathlib import Path

from schemas import store
from schemas.checkpoint import read_manifest
from schemas.records import ModelVersion


async def register_checkpoint(conn, *, path: Path, kind: str, status: str, actor: str,
                              reason: str | None = None, **lineage) -> ModelVersion:
    """Verify a published checkpoint against its manifest and register it. Call inside a
    transaction: the version row and its audit entry land together or not at all."""
    manifest = read_manifest(path)
    version = await store.insert_model_version(
        conn, kind=kind, path=str(Path(path).resolve()), content_hash=manifest["content_hash"],
        status=status, metrics=manifest.get("metrics", {}), **lineage)
    await store.insert_promotion(conn, version_id=version.id, action="register", actor=actor,
                                 reason=reason)
    return version


async def ensure_initial_policy(conn, *, path: Path, actor: str) -> ModelVersion:
    """The active policy; when there is none yet, `path` registered as the first, active."""
    async with conn.transaction():
        # Serialise concurrent first starts so only one registers version 1.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('feedloop.initial_policy'))")
        active = await store.get_active_version(conn, kind="policy")
        if active is not None:
            return active
        return await register_checkpoint(conn, path=path, kind="policy", status="active",
                                         actor=actor, reason="initial policy")
