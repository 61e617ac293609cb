"""Training runs: queued by operators, claimed by one trainer, finished with their outcome."""
from psycopg.types.json import Jsonb

from schemas.errors import NotFound
from schemas.records import TrainingRun
from store.sql import execute, fetch_all, fetch_one


async def start_training_run(conn, *, kind: str, config: dict, trigger: str,
                             requested_by: str | None = None) -> TrainingRun:
    return TrainingRun(**await fetch_one(conn, "start_training_run", kind=kind, config=Jsonb(config),
                                    trigger=trigger, requested_by=requested_by))


async def queue_training_run(conn, *, kind: str, config: dict, requested_by: str) -> TrainingRun:
    return TrainingRun(**await fetch_one(conn, "queue_training_run", kind=kind, config=Jsonb(config),
                                    trigger="operator", requested_by=requested_by))


async def claim_queued_run(conn) -> TrainingRun | None:
    row = await fetch_one(conn, "claim_queued_run")
    return TrainingRun(**row) if row else None


async def finish_training_run(conn, *, id: int, status: str, metrics: dict | None = None,
                              curves: dict | None = None, error: str | None = None,
                              watermark: int | None = None) -> TrainingRun:
    return TrainingRun(**await fetch_one(conn, "finish_training_run", id=id, status=status,
                                    metrics=Jsonb(metrics or {}), curves=Jsonb(curves or {}),
                                    error=error, watermark=watermark))


async def set_run_version(conn, *, id: int, version_id: int) -> None:
    await execute(conn, "set_run_version", id=id, version_id=version_id)


async def fail_abandoned_runs(conn) -> list[int]:
    return [r["id"] for r in await fetch_all(conn, "fail_abandoned_runs")]


async def last_round_watermark(conn) -> int:
    row = await fetch_one(conn, "last_round_watermark")
    return row["watermark"] if row else 0


async def list_training_runs(conn, *, limit: int = 100) -> list[TrainingRun]:
    return [TrainingRun(**r) for r in await fetch_all(conn, "list_training_runs", limit=limit)]


async def get_training_run(conn, *, id: int) -> TrainingRun:
    row = await fetch_one(conn, "get_training_run", id=id)
    if row is None:
        raise NotFound(f"no training run {id}")
    return TrainingRun(**row)


async def trained_round_watermarks(conn) -> list[int]:
    """The watermark of every round that trained, oldest first."""
    return [r["watermark"] for r in await fetch_all(conn, "trained_round_watermarks")]
