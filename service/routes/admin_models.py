"""The model registry: list versions, promote, roll back, canary, reject, verify a repaired
checkpoint, and say where each is served. Switches that change what serves go through
service/targets.py: a version served by an inference server is deployed (the hook) and its target
checked before the registry changes."""
from fastapi import APIRouter

from schemas.records import (CanaryAction, ListPublic, ModelAction, ModelImport, ModelVersion, ModelVersionPublic, Promotion,
                             ServingTarget, TargetUpdate)
from service import model_import, targets
from service.deps import OPERATORS_ONLY, ConnDep, OperatorKey, SettingsDep
from service.errors import ERROR_RESPONSES
from store import exchanges, registry

router = APIRouter(prefix="/v1/admin/models", tags=["admin"],
                   responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400]}, dependencies=OPERATORS_ONLY)


def actor(key) -> str:
    return f"key:{key.id}:{key.name}"


def target(version: ModelVersion, settings) -> ServingTarget | None:
    try:
        found = targets.target_of(version, settings)
    except targets.TargetRefused:
        return None
    return ServingTarget(endpoint=found.endpoint, model_id=found.model_id) if found else None


async def public(conn, version, settings) -> ModelVersionPublic:
    counts = await exchanges.requests_per_version(conn)
    return ModelVersionPublic(**version.model_dump(exclude={"name"}), requests=counts.get(version.id, 0),
                              target=target(version, settings))


@router.get("", response_model=ListPublic[ModelVersionPublic])
async def list_models(conn: ConnDep, settings: SettingsDep) -> ListPublic[ModelVersionPublic]:
    """Every version, newest first: status, lineage, serving target, metrics, requests served."""
    counts = await exchanges.requests_per_version(conn)
    data = [ModelVersionPublic(**v.model_dump(exclude={"name"}), requests=counts.get(v.id, 0),
                               target=target(v, settings))
            for v in await registry.list_model_versions(conn)]
    return ListPublic(data=data, count=len(data))


@router.get("/history", response_model=ListPublic[Promotion])
async def history(conn: ConnDep) -> ListPublic[Promotion]:
    """The audit log: what was registered, promoted, rolled back, rejected, failed or retargeted, by whom."""
    entries = await registry.list_promotions(conn)
    return ListPublic(data=entries, count=len(entries))


@router.post("/import", response_model=ModelVersionPublic)
async def import_model(body: ModelImport, conn: ConnDep, operator: OperatorKey,
                       settings: SettingsDep) -> ModelVersionPublic:
    """Register any Hugging Face causal-LM directory as a candidate policy: checked (config,
    weights, tokenizer, a chat template taking add_generation_prompt, an end of turn, a pad that is
    none), given a pad token when it has none, its manifest kept in the data directory; the
    source is never written. A 400 names what is missing, and nothing is registered."""
    version = await model_import.import_policy(conn, settings, path=body.path, actor=actor(operator),
                                               reason=body.reason)
    return await public(conn, version, settings)


@router.post("/{version_id}/promote", response_model=ModelVersionPublic)
async def promote(version_id: int, conn: ConnDep, operator: OperatorKey, settings: SettingsDep,
                  body: ModelAction | None = None) -> ModelVersionPublic:
    """Make this version the active one; every replica switches to it without failing a request.
    Served remotely: its target is deployed and checked first (409 with the reason otherwise)."""
    version = await targets.promote(conn, settings, id=version_id, actor=actor(operator),
                                    reason=body and body.reason)
    return await public(conn, version, settings)


@router.post("/{version_id}/rollback", response_model=ModelVersionPublic)
async def rollback(version_id: int, conn: ConnDep, operator: OperatorKey, settings: SettingsDep,
                   body: ModelAction | None = None) -> ModelVersionPublic:
    """Roll the active version `version_id` back to the version active before it."""
    current = await registry.get_model_version(conn, id=version_id)
    version = await targets.rollback(conn, settings, kind=current.kind, actor=actor(operator),
                                     reason=body and body.reason, expect_active=version_id)
    return await public(conn, version, settings)


@router.post("/{version_id}/canary", response_model=ModelVersionPublic)
async def canary(version_id: int, body: CanaryAction, conn: ConnDep, operator: OperatorKey,
                 settings: SettingsDep) -> ModelVersionPublic:
    """Let this version answer `fraction` of the requests for the served model."""
    version = await targets.canary(conn, settings, id=version_id, fraction=body.fraction,
                                   actor=actor(operator), reason=body.reason)
    return await public(conn, version, settings)


@router.post("/{version_id}/verify", response_model=ModelVersionPublic, responses={409: ERROR_RESPONSES[400]})
async def verify(version_id: int, conn: ConnDep, operator: OperatorKey, settings: SettingsDep,
                 body: ModelAction | None = None) -> ModelVersionPublic:
    """Hash the version's checkpoint again and compare it with the registered hash: a `failed`
    version whose files match again (repaired, restored from a backup) becomes `archived`, under
    its own name, ready to be promoted; a mismatch is a 409 that says so."""
    version = await registry.verify(conn, id=version_id, actor=actor(operator), reason=body and body.reason)
    return await public(conn, version, settings)


@router.post("/{version_id}/reject", response_model=ModelVersionPublic)
async def reject(version_id: int, conn: ConnDep, operator: OperatorKey, settings: SettingsDep,
                 body: ModelAction | None = None) -> ModelVersionPublic:
    """Take a candidate or canary out of consideration."""
    version = await registry.reject(conn, id=version_id, actor=actor(operator), reason=body and body.reason)
    return await public(conn, version, settings)


@router.post("/{version_id}/target", response_model=ModelVersionPublic)
async def set_target(version_id: int, body: TargetUpdate, conn: ConnDep, operator: OperatorKey,
                     settings: SettingsDep) -> ModelVersionPublic:
    """Say where this version is served: the server's endpoint and the model id it is asked for
    (null: back to the default). Audited as 'retarget'; a version that serves now is deployed and
    checked on the new target first, and its replicas move to it without failing a request."""
    version = await targets.retarget(conn, settings, id=version_id, actor=actor(operator), reason=body.reason,
                                     **body.changes())
    return await public(conn, version, settings)
