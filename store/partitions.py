"""The exchange tables' month partitions (migration 013 says how they are keyed): made ahead of
time at every start-up and by the trainer's daily job, and, when a retention is set, dropped
whole once they are older than it (`FEEDLOOP_RETENTION_DAYS`; trainer/retention.py)."""
from datetime import datetime, timedelta, timezone

import psycopg

from store.sql import Q, execute, fetch_all, fetch_one

MONTHS_AHEAD = 3  # a trainer down for this long still finds this month partitioned


def ensure_ahead(conn: psycopg.Connection) -> int:
    """Make the month partitions up to `MONTHS_AHEAD` months on (synchronous: `store.db.migrate`
    runs it); returns how many tables were made."""
    return conn.execute(Q["ensure_partitions"], dict(months_ahead=MONTHS_AHEAD)).fetchone()[0]


async def ensure_ahead_async(conn) -> int:
    return (await fetch_one(conn, "ensure_partitions", months_ahead=MONTHS_AHEAD))["made"]


async def expire(conn, *, retention_days: float, now: datetime | None = None) -> list[str]:
    """Drop the months wholly older than `retention_days` (their exchanges, choices, feedback and
    rankings, and the preferences and stored training pairs that point into them: see
    `drop_exchange_partitions` in migration 013, and the judged answers noted of them: migration
    020); returns the months dropped ('YYYY_MM'). One transaction: all of a run's months go, or
    none."""
    horizon = (now or datetime.now(timezone.utc)) - timedelta(days=retention_days)
    async with conn.transaction():
        dropped = (await fetch_one(conn, "drop_partitions_before", horizon=horizon))["dropped"]
        await execute(conn, "forget_dropped_judged_answers", horizon=horizon)
        return dropped


async def list_partitions(conn) -> list[dict]:
    return await fetch_all(conn, "list_partitions")
