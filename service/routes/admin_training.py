"""Training rounds: their history, and asking for one now (a trainer process takes it)."""
from fastapi import APIRouter

from schemas import store
from schemas.records import ListPublic, TrainingRun, TrainingRunCreate
from service.deps import ConnDep, OperatorKey
from service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/admin/training/runs", tags=["admin"], responses=ERROR_RESPONSES)
CHANNEL = "feedloop_training"  # the trainer service listens here for queued runs


@router.get("", response_model=ListPublic[TrainingRun])
async def list_runs(conn: ConnDep, operator: OperatorKey, limit: int = 100) -> ListPublic[TrainingRun]:
    """Rounds, newest first: status, watermark, config, metrics and curves, error, version made."""
    runs = await store.list_training_runs(conn, limit=min(max(limit, 1), 1000))
    return ListPublic(data=runs, count=len(runs))


@router.get("/{run_id}", response_model=TrainingRun)
async def get_run(run_id: int, conn: ConnDep, operator: OperatorKey) -> TrainingRun:
    return await store.get_training_run(conn, id=run_id)


@router.post("", status_code=202, response_model=TrainingRun)
async def queue_run(conn: ConnDep, operator: OperatorKey, body: TrainingRunCreate | None = None) -> TrainingRun:
    """Queue a round now; the next free trainer takes it (202: accepted, not yet run)."""
    body = body or TrainingRunCreate()
    async with conn.transaction():
        run = await store.queue_training_run(conn, kind=body.kind, config=body.config,
                                             requested_by=f"key:{operator.id}:{operator.name}")
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(run.id)))
    return run
