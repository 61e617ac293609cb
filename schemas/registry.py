"""Domain operations on the model registry, shared by the service, the trainer and the CLI.

Each status change is one transaction that appends to the `promotions` audit log and sends
`NOTIFY feedloop_registry`, which every serving replica listens for (Postgres delivers it on
commit, so a replica never sees a change that was rolled back)."""
from pathlib import Path

from schemas import store
from schemas.checkpoint import read_manifest
from schemas.records import ModelVersion
from schemas.store import Conflict

CHANNEL = "feedloop_registry"


async def _notify(conn, version: ModelVersion, action: str) -> None:
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{action}:{version.id}"))


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
    if status == "active":
        await store.insert_promotion(conn, version_id=version.id, action="promote", actor=actor,
                                     reason=reason)
        await _notify(conn, version, "promote")
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


async def _activate(conn, version: ModelVersion, *, action: str, actor: str,
                    reason: str | None) -> ModelVersion:
    await store.archive_active(conn, kind=version.kind)
    version = await store.set_version_status(conn, id=version.id, status="active", actor=actor)
    await store.insert_promotion(conn, version_id=version.id, action=action, actor=actor, reason=reason)
    await _notify(conn, version, action)
    return version


async def promote(conn, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    """Make a candidate (or canary, or archived) version the active one of its kind."""
    async with conn.transaction():
        version = await store.lock_version(conn, id=id)
        if version.status == "active":
            raise Conflict(f"version {id} is active already")
        if version.status not in ("candidate", "canary", "archived"):
            raise Conflict(f"version {id} is {version.status}; only candidate, canary or archived "
                           "versions can be promoted")
        return await _activate(conn, version, action="promote", actor=actor, reason=reason)


async def rollback(conn, *, actor: str, kind: str = "policy", reason: str | None = None) -> ModelVersion:
    """Return to the version that was active before the current one."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('feedloop.registry'))")
        history = await store.list_activations(conn, kind=kind, limit=50)
        current = await store.get_active_version(conn, kind=kind)
        if current is None:
            raise Conflict(f"no active {kind} version to roll back from")
        previous = next((h["version_id"] for h in history if h["version_id"] != current.id), None)
        if previous is None:
            raise Conflict(f"{current.name} has no earlier active version to roll back to")
        target = await store.lock_version(conn, id=previous)
        if target.status in ("failed", "rejected"):
            raise Conflict(f"the previous version {target.name} is {target.status}")
        return await _activate(conn, target, action="rollback", actor=actor,
                               reason=reason or f"rollback from {current.name}")


async def canary(conn, *, id: int, fraction: float, actor: str, reason: str | None = None) -> ModelVersion:
    """Let a policy version take `fraction` of the traffic beside the active one."""
    async with conn.transaction():
        version = await store.lock_version(conn, id=id)
        if version.kind != "policy" or version.status not in ("candidate", "archived", "canary"):
            raise Conflict(f"version {id} is a {version.status} {version.kind}; only candidate or "
                           "archived policies can be canaries")
        version = await store.set_version_status(conn, id=id, status="canary", actor=actor,
                                                 canary_fraction=fraction)
        await store.insert_promotion(conn, version_id=id, action="canary", actor=actor,
                                     reason=reason or f"{fraction:.0%} of traffic")
        await _notify(conn, version, "canary")
        return version


async def reject(conn, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    async with conn.transaction():
        version = await store.lock_version(conn, id=id)
        if version.status not in ("candidate", "canary"):
            raise Conflict(f"version {id} is {version.status}; only candidates and canaries can be rejected")
        version = await store.set_version_status(conn, id=id, status="rejected", actor=actor)
        await store.insert_promotion(conn, version_id=id, action="reject", actor=actor, reason=reason)
        await _notify(conn, version, "reject")
        return version


async def mark_failed(conn, *, id: int, actor: str, reason: str,
                      restore: int | None = None) -> ModelVersion:
    """A version that cannot be served: `failed`, and when it had been made active, `restore`
    (the version still serving) becomes active again, so the registry says what really serves."""
    async with conn.transaction():
        version = await store.lock_version(conn, id=id)
        if version.status == "failed":
            return version
        was_active = version.status == "active"
        version = await store.set_version_status(conn, id=id, status="failed", actor=actor)
        await store.insert_promotion(conn, version_id=id, action="fail", actor=actor, reason=reason[:2000])
        if was_active and restore is not None:
            target = await store.lock_version(conn, id=restore)
            await _activate(conn, target, action="rollback", actor=actor,
                            reason=f"{version.name} failed to load")
        await _notify(conn, version, "fail")
        return version
