"""The model registry: versions, their status, and the audit log of what served when.

Operations shared by the service, the trainer and the CLI. Each status change is one transaction
that appends to the `promotions` audit log and notifies the registry channel (store/locks.py),
which every serving replica listens on; Postgres delivers it on commit, so a replica never sees a
change that was rolled back."""
import asyncio
from pathlib import Path

from psycopg.types.json import Jsonb

from schemas.checkpoint import BadCheckpoint, read_manifest
from schemas.errors import Conflict, NotFound
from schemas.records import ModelVersion, Promotion
from store import locks
from store.sql import fetch_all, fetch_one


# --- rows -----------------------------------------------------------------------------------

async def insert_model_version(conn, *, kind: str, path: str, content_hash: str, status: str,
                               parent_id: int | None = None, reference_id: int | None = None,
                               reward_model_id: int | None = None, endpoint: str | None = None,
                               model_id: str | None = None, training_run_id: int | None = None,
                               metrics: dict | None = None) -> ModelVersion:
    row = await fetch_one(conn, "insert_model_version", kind=kind, parent_id=parent_id,
                     reference_id=reference_id, reward_model_id=reward_model_id, path=path,
                     content_hash=content_hash, endpoint=endpoint, model_id=model_id, status=status,
                     training_run_id=training_run_id, metrics=Jsonb(metrics or {}))
    return ModelVersion(**row)


async def get_model_version(conn, *, id: int) -> ModelVersion:
    row = await fetch_one(conn, "get_model_version", id=id)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def get_active_version(conn, *, kind: str = "policy") -> ModelVersion | None:
    row = await fetch_one(conn, "get_active_version", kind=kind)
    return ModelVersion(**row) if row else None


async def list_serving_versions(conn) -> list[ModelVersion]:
    return [ModelVersion(**r) for r in await fetch_all(conn, "list_serving_versions")]


async def list_model_versions(conn) -> list[ModelVersion]:
    return [ModelVersion(**r) for r in await fetch_all(conn, "list_model_versions")]


async def set_version_status(conn, *, id: int, status: str, actor: str,
                             canary_fraction: float | None = None) -> ModelVersion:
    row = await fetch_one(conn, "set_version_status", id=id, status=status, actor=actor,
                     canary_fraction=canary_fraction)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def set_version_target(conn, *, id: int, endpoint: str | None, model_id: str | None) -> ModelVersion:
    row = await fetch_one(conn, "set_version_target", id=id, endpoint=endpoint, model_id=model_id)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def insert_promotion(conn, *, version_id: int, action: str, actor: str,
                           reason: str | None = None) -> Promotion:
    return Promotion(**await fetch_one(conn, "insert_promotion", version_id=version_id, action=action,
                                  actor=actor, reason=reason))


async def list_promotions(conn, *, limit: int = 200) -> list[Promotion]:
    return [Promotion(**r) for r in await fetch_all(conn, "list_promotions", limit=limit)]


async def list_activations(conn, *, kind: str, limit: int = 2) -> list[int]:
    """Ids of the versions in the order they became active, newest first."""
    return [r["version_id"] for r in await fetch_all(conn, "list_activations", kind=kind, limit=limit)]


async def lock_version(conn, *, id: int) -> ModelVersion:
    row = await fetch_one(conn, "lock_version", id=id)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def archive_active(conn, *, kind: str) -> ModelVersion | None:
    row = await fetch_one(conn, "archive_active", kind=kind)
    return ModelVersion(**row) if row else None


# --- rules: which status changes apply (checked again inside each operation's transaction) ---

PROMOTABLE = ("candidate", "canary", "archived")
CANARY_FROM = ("candidate", "archived", "canary")


def check_promotable(version: ModelVersion) -> None:
    if version.status == "active":
        raise Conflict(f"version {version.id} is active already", code="already_active")
    if version.status not in PROMOTABLE:
        raise Conflict(f"version {version.id} is {version.status}; only candidate, canary or archived "
                       "versions can be promoted", code="invalid_status")


def check_canary(version: ModelVersion) -> None:
    if version.kind != "policy" or version.status not in CANARY_FROM:
        raise Conflict(f"version {version.id} is a {version.status} {version.kind}; only candidate or "
                       "archived policies can be canaries", code="invalid_status")


# --- operations ---------------------------------------------------------------------------

async def _notify(conn, version: ModelVersion, action: str) -> None:
    await locks.notify_registry(conn, f"{action}:{version.id}")


async def register_checkpoint(conn, *, path: Path, kind: str, status: str, actor: str,
                              reason: str | None = None, **lineage) -> ModelVersion:
    """Verify a published checkpoint against its manifest and register it. Call inside a
    transaction: the version row and its audit entry land together or not at all. `lineage` may
    also name its serving target (`endpoint`, `model_id`)."""
    manifest = read_manifest(path)
    version = await insert_model_version(
        conn, kind=kind, path=str(Path(path).resolve()), content_hash=manifest["content_hash"],
        status=status, metrics=manifest.get("metrics", {}), **lineage)
    await insert_promotion(conn, version_id=version.id, action="register", actor=actor,
                                 reason=reason)
    if status == "active":
        await insert_promotion(conn, version_id=version.id, action="promote", actor=actor,
                                     reason=reason)
        await _notify(conn, version, "promote")
    return version


async def ensure_initial_policy(conn, *, path: Path, actor: str) -> ModelVersion:
    """The active policy; when there is none, the checkpoint at `path` becomes it: the version
    registered from that directory with that very content when there is one (a `failed` one
    whose files are intact again is restored first, audited), else a new version. Raises
    BadCheckpoint when the files do not match their manifest."""
    async with conn.transaction():
        # Serialise concurrent first starts so only one registers version 1.
        await locks.lock_for_transaction(conn, locks.INITIAL_POLICY)
        active = await get_active_version(conn, kind="policy")
        if active is not None:
            return active
        manifest = read_manifest(path)
        for row in await fetch_all(conn, "find_version_by_path", path=str(Path(path).resolve()),
                                   content_hash=manifest["content_hash"]):
            known = await lock_version(conn, id=row["id"])
            if known.kind != "policy" or known.status not in ("failed", "archived"):
                continue
            if known.status == "failed":
                known = await _restore(conn, known, actor=actor, reason="its files match the registered hash again")
            return await _activate(conn, known, action="rollback", actor=actor,
                                   reason="no active policy: the intact checkpoint at FEEDLOOP_POLICY_PATH")
        return await register_checkpoint(conn, path=path, kind="policy", status="active",
                                         actor=actor, reason="initial policy")


async def _activate(conn, version: ModelVersion, *, action: str, actor: str,
                    reason: str | None) -> ModelVersion:
    await archive_active(conn, kind=version.kind)
    version = await set_version_status(conn, id=version.id, status="active", actor=actor)
    await insert_promotion(conn, version_id=version.id, action=action, actor=actor, reason=reason)
    await _notify(conn, version, action)
    return version


async def promote(conn, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    """Make a candidate (or canary, or archived) version the active one of its kind."""
    async with conn.transaction():
        version = await lock_version(conn, id=id)
        check_promotable(version)
        return await _activate(conn, version, action="promote", actor=actor, reason=reason)


async def rollback_target(conn, *, kind: str = "policy") -> tuple[ModelVersion, ModelVersion]:
    """(the active version, the one a rollback returns to), or Conflict when there is none."""
    history = await list_activations(conn, kind=kind, limit=50)
    current = await get_active_version(conn, kind=kind)
    if current is None:
        raise Conflict(f"no active {kind} version to roll back from", code="nothing_to_roll_back")
    previous = next((v for v in history if v != current.id), None)
    if previous is None:
        raise Conflict(f"{current.name} has no earlier active version to roll back to",
                       code="nothing_to_roll_back")
    target = await get_model_version(conn, id=previous)
    if target.status in ("failed", "rejected"):
        raise Conflict(f"the previous version {target.name} is {target.status}", code="invalid_status")
    return current, target


async def rollback(conn, *, actor: str, kind: str = "policy", reason: str | None = None,
                   to: int | None = None) -> ModelVersion:
    """Return to the version that was active before the current one; with `to`, only when that is
    still the version a rollback returns to (it was checked before)."""
    async with conn.transaction():
        await locks.lock_for_transaction(conn, locks.REGISTRY)
        current, target = await rollback_target(conn, kind=kind)
        if to is not None and target.id != to:
            raise Conflict(f"the registry changed: a rollback now returns to {target.name}, not v{to}; "
                           "try again", code="registry_changed")
        target = await lock_version(conn, id=target.id)
        if target.status in ("failed", "rejected"):
            raise Conflict(f"the previous version {target.name} is {target.status}", code="invalid_status")
        return await _activate(conn, target, action="rollback", actor=actor,
                               reason=reason or f"rollback from {current.name}")


async def canary(conn, *, id: int, fraction: float, actor: str, reason: str | None = None) -> ModelVersion:
    """Let a policy version take `fraction` of the traffic beside the active one."""
    async with conn.transaction():
        version = await lock_version(conn, id=id)
        check_canary(version)
        version = await set_version_status(conn, id=id, status="canary", actor=actor,
                                                 canary_fraction=fraction)
        await insert_promotion(conn, version_id=id, action="canary", actor=actor,
                                     reason=reason or f"{fraction:.0%} of traffic")
        await _notify(conn, version, "canary")
        return version


async def reject(conn, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    async with conn.transaction():
        version = await lock_version(conn, id=id)
        if version.status not in ("candidate", "canary"):
            raise Conflict(f"version {id} is {version.status}; only candidates and canaries can be rejected",
                           code="invalid_status")
        version = await set_version_status(conn, id=id, status="rejected", actor=actor)
        await insert_promotion(conn, version_id=id, action="reject", actor=actor, reason=reason)
        await _notify(conn, version, "reject")
        return version


async def retarget(conn, *, id: int, endpoint: str | None, model_id: str | None, actor: str,
                   reason: str | None = None) -> ModelVersion:
    """Say where a version is served (None: the defaults); audited as 'retarget' with the change.
    Replicas serving it re-sync on the notification."""
    async with conn.transaction():
        before = await lock_version(conn, id=id)
        version = await set_version_target(conn, id=id, endpoint=endpoint, model_id=model_id)
        change = (f"endpoint {before.endpoint or 'default'} -> {endpoint or 'default'}, "
                  f"model id {before.model_id or 'default'} -> {model_id or 'default'}")
        await insert_promotion(conn, version_id=id, action="retarget", actor=actor,
                               reason=f"{reason}: {change}" if reason else change)
        await _notify(conn, version, "retarget")
        return version


async def fallback_candidates(conn, *, kind: str = "policy") -> list[ModelVersion]:
    """Versions that served before and may serve again (archived), most recently active first."""
    found, seen = [], set()
    for vid in await list_activations(conn, kind=kind, limit=1000):
        if vid not in seen:
            seen.add(vid)
            version = await get_model_version(conn, id=vid)
            if version.status == "archived":
                found.append(version)
    return found


async def fall_back(conn, *, id: int, actor: str, reason: str) -> ModelVersion | None:
    """Make the archived version `id` active because none of its kind is (the active one failed);
    None when another replica made a version active meanwhile."""
    async with conn.transaction():
        await locks.lock_for_transaction(conn, locks.REGISTRY)
        version = await lock_version(conn, id=id)
        if version.status != "archived" or await get_active_version(conn, kind=version.kind) is not None:
            return None
        return await _activate(conn, version, action="rollback", actor=actor, reason=reason)


async def _restore(conn, version: ModelVersion, *, actor: str, reason: str) -> ModelVersion:
    version = await set_version_status(conn, id=version.id, status="archived", actor=actor)
    await insert_promotion(conn, version_id=version.id, action="restore", actor=actor, reason=reason)
    await _notify(conn, version, "restore")
    return version


async def verify(conn, *, id: int, actor: str, reason: str | None = None) -> ModelVersion:
    """Hash the version's checkpoint again (blocking file reads, in a thread) and `restore` it when
    it matches the registered hash; Conflict `checkpoint_mismatch` when it still does not."""
    version = await get_model_version(conn, id=id)
    try:
        manifest = await asyncio.to_thread(read_manifest, version.path)
    except BadCheckpoint as e:
        raise Conflict(f"{version.name} is still not intact: {e}", code="checkpoint_mismatch") from e
    return await restore(conn, id=id, content_hash=manifest["content_hash"], actor=actor, reason=reason)


async def restore(conn, *, id: int, content_hash: str, actor: str, reason: str | None = None) -> ModelVersion:
    """A `failed` version whose files were checked again and hash to `content_hash`: archived, so
    it can be promoted again under its own name. Conflict when the hash is not the registered one."""
    async with conn.transaction():
        version = await lock_version(conn, id=id)
        if content_hash != version.content_hash:
            raise Conflict(f"{version.name}'s files hash to {content_hash}, not the registered "
                           f"{version.content_hash}", code="checkpoint_mismatch")
        if version.status != "failed":
            return version
        return await _restore(conn, version, actor=actor, reason=reason or "files verified against the registered hash")


async def mark_failed(conn, *, id: int, actor: str, reason: str,
                      restore: int | None = None) -> ModelVersion:
    """A version that cannot be served: `failed`, and when it had been made active, `restore`
    (the version still serving) becomes active again, so the registry says what really serves."""
    async with conn.transaction():
        version = await lock_version(conn, id=id)
        if version.status == "failed":
            return version
        was_active = version.status == "active"
        version = await set_version_status(conn, id=id, status="failed", actor=actor)
        await insert_promotion(conn, version_id=id, action="fail", actor=actor, reason=reason[:2000])
        if was_active and restore is not None:
            target = await lock_version(conn, id=restore)
            await _activate(conn, target, action="rollback", actor=actor,
                            reason=f"{version.name} failed to load")
        await _notify(conn, version, "fail")
        return version
