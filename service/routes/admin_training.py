"""Training rounds: their history, and asking for one now (a trainer process takes it)."""
from fastapi import APIRouter

from schemas.records import ListPublic, TrainingRun, TrainingRunCreate
from service.deps import OPERATORS_ONLY, ConnDep, OperatorKey
from service.errors import ERROR_RESPONSES
from store import runs

router = APIRouter(prefix="/v1/admin/training/runs", tags=["admin"], responses=ERROR_RESPONSES,
                   dependencies=OPERATORS_ONLY)


@router.get("", response_model=ListPublic[TrainingRun])
async def list_runs(conn: ConnDep, limit: int = 100) -> ListPublic[TrainingRun]:
    """Rounds, newest first: status, watermark, config, metrics and curves, error, version made."""
    found = await runs.list_training_runs(conn, limit=min(max(limit, 1), 1000))
    return ListPublic(data=found, count=len(found))


@router.get("/{run_id}", response_model=TrainingRun)
async def get_run(run_id: int, conn: ConnDep) -> TrainingRun:
    return await runs.get_training_run(conn, id=run_id)


@router.post("", status_code=202, response_model=TrainingRun)
async def queue_run(conn: ConnDep, operator: OperatorKey, body: TrainingRunCreate | None = None) -> TrainingRun:
    """Queue a round now; a trainer polling the queue takes it within seconds (202: accepted,
    not yet run)."""
    body = body or TrainingRunCreate()
    return await runs.queue_training_run(conn, kind=body.kind, config=body.config,
                                         requested_by=f"key:{operator.id}:{operator.name}")
