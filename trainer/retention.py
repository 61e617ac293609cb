"""The trainer's partition job: the coming months' partitions made (so this month's exchanges
never fall into a default partition), and, when `FEEDLOOP_RETENTION_DAYS` is set, the months
wholly older than it dropped (store/partitions.py; what goes with them: migration 013)."""
import asyncio
import logging

import psycopg

from schemas.settings import Settings
from store import partitions

log = logging.getLogger(__name__)


async def maintain(url: str, retention_days: float | None) -> list[str]:
    """Make partitions ahead, then drop the expired months; returns those dropped."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await partitions.ensure_ahead_async(conn)
        if retention_days is None:
            return []
        return await partitions.expire(conn, retention_days=retention_days)


def partition_job(url: str, settings: Settings) -> None:
    """The scheduled job; a failure (a lock not had in time, the database away) waits for the next tick."""
    try:
        dropped = asyncio.run(maintain(url, settings.retention_days))
    except Exception:
        log.exception("partition maintenance failed")
        return
    if dropped:
        log.info("retention: dropped the exchanges of %s", ", ".join(dropped))
