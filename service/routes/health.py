"""Liveness, readiness and Prometheus metrics: open to anyone, no key needed."""
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import PoolDep, ServingDep
from service.errors import ApiError
from store.db import ping

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "database or model not ready"}})
async def ready(pool: PoolDep, serving: ServingDep) -> dict:
    """Ready to answer chats: the database answers and a policy is loaded."""
    try:
        async with pool.connection(timeout=2) as conn:
            await ping(conn)
    except Exception as e:
        raise ApiError(503, f"database not reachable: {e}", type="service_unavailable")
    if not serving.ready:
        raise ApiError(503, "no model loaded yet", type="service_unavailable")
    return {"status": "ready", "model": serving.active.version.name}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
