"""The model registry: list versions, promote, roll back, canary, reject."""
import asyncio

from fastapi import APIRouter

from schemas.checkpoint import BadCheckpoint, read_manifest
from schemas.errors import Conflict
from schemas.records import CanaryAction, ListPublic, ModelAction, ModelVersionPublic, Promotion
from service.deps import OPERATORS_ONLY, ConnDep, OperatorKey
from service.errors import ERROR_RESPONSES, ApiError
from store import exchanges, registry

router = APIRouter(prefix="/v1/admin/models", tags=["admin"],
                   responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]}, dependencies=OPERATORS_ONLY)


def actor(key) -> str:
    return f"key:{key.id}:{key.name}"


async def public(conn, version) -> ModelVersionPublic:
    counts = await exchanges.requests_per_version(conn)
    return ModelVersionPublic(**version.model_dump(exclude={"name"}), requests=counts.get(version.id, 0))


@router.get("", response_model=ListPublic[ModelVersionPublic])
async def list_models(conn: ConnDep) -> ListPublic[ModelVersionPublic]:
    """Every version, newest first: status, lineage, metrics, requests served."""
    counts = await exchanges.requests_per_version(conn)
    data = [ModelVersionPublic(**v.model_dump(exclude={"name"}), requests=counts.get(v.id, 0))
            for v in await registry.list_model_versions(conn)]
    return ListPublic(data=data, count=len(data))


@router.get("/history", response_model=ListPublic[Promotion])
async def history(conn: ConnDep) -> ListPublic[Promotion]:
    """The audit log: what was registered, promoted, rolled back, rejected or failed, by whom."""
    entries = await registry.list_promotions(conn)
    return ListPublic(data=entries, count=len(entries))


@router.post("/{version_id}/promote", response_model=ModelVersionPublic)
async def promote(version_id: int, conn: ConnDep, operator: OperatorKey,
                  body: ModelAction | None = None) -> ModelVersionPublic:
    """Make this version the active one; every replica switches to it without failing a request."""
    version = await registry.promote(conn, id=version_id, actor=actor(operator), reason=body and body.reason)
    return await public(conn, version)


@router.post("/{version_id}/rollback", response_model=ModelVersionPublic)
async def rollback(version_id: int, conn: ConnDep, operator: OperatorKey,
                   body: ModelAction | None = None) -> ModelVersionPublic:
    """Roll the active version `version_id` back to the version active before it."""
    active = await registry.get_active_version(conn, kind=(await registry.get_model_version(conn, id=version_id)).kind)
    if active is None or active.id != version_id:
        raise ApiError(409, f"version {version_id} is not the active version", code="not_active")
    version = await registry.rollback(conn, kind=active.kind, actor=actor(operator), reason=body and body.reason)
    return await public(conn, version)


@router.post("/{version_id}/canary", response_model=ModelVersionPublic)
async def canary(version_id: int, body: CanaryAction, conn: ConnDep,
                 operator: OperatorKey) -> ModelVersionPublic:
    """Let this version answer `fraction` of the requests for the served model."""
    version = await registry.canary(conn, id=version_id, fraction=body.fraction, actor=actor(operator),
                                    reason=body.reason)
    return await public(conn, version)


@router.post("/{version_id}/verify", response_model=ModelVersionPublic, responses={409: ERROR_RESPONSES[400]})
async def verify(version_id: int, conn: ConnDep, operator: OperatorKey,
                 body: ModelAction | None = None) -> ModelVersionPublic:
    """Hash the version's checkpoint again and compare it with the registered hash: a `failed`
    version whose files match again (repaired, restored from a backup) becomes `archived`, under
    its own name, ready to be promoted; a mismatch is a 409 that says so."""
    version = await registry.get_model_version(conn, id=version_id)
    try:
        manifest = await asyncio.to_thread(read_manifest, version.path)
    except BadCheckpoint as e:
        raise Conflict(f"{version.name} is still not intact: {e}", code="checkpoint_mismatch") from e
    version = await registry.restore(conn, id=version_id, content_hash=manifest["content_hash"],
                                     actor=actor(operator), reason=body and body.reason)
    return await public(conn, version)


@router.post("/{version_id}/reject", response_model=ModelVersionPublic)
async def reject(version_id: int, conn: ConnDep, operator: OperatorKey,
                 body: ModelAction | None = None) -> ModelVersionPublic:
    """Take a candidate or canary out of consideration."""
    version = await registry.reject(conn, id=version_id, actor=actor(operator), reason=body and body.reason)
    return await public(conn, version)
