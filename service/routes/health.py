"""Liveness, readiness and Prometheus metrics: open to anyone by default (service/auth.py)."""
import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas.errors import Unavailable
from schemas.openai import ErrorResponse
from service.deps import DatabaseDep, ServingDep
from service.errors import ApiError
from store.db import ping

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse, "description": "database or model not ready"}})
async def ready(db: DatabaseDep, serving: ServingDep) -> dict:
    """Ready to answer chats: the database answers and a policy is loaded. What is wrong is said
    in general terms; the details are in the server's log, not shown to anyone who asks."""
    try:
        await db.retrying(ping)
    except Unavailable:
        raise ApiError(503, "The database is not reachable.", code="database_unavailable",
                       headers={"Retry-After": "1"}) from None
    if not serving.ready:
        why = "The model's engine is restarting." if serving.active is not None else "No model is loaded yet."
        raise ApiError(503, why, code="model_not_ready", headers={"Retry-After": "5"})
    return {"status": "ready", "model": serving.active.version.name}


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
