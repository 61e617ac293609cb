"""`feedloop trainer`: the trainer service. APScheduler tries a round on an interval or cron
schedule (it trains once enough new feedback arrived, or the oldest waited long enough:
`trainer.round.waiting_reason`) and takes rounds operators queued through the API; the round lock makes any number of
replicas safe. At start-up, rounds a killed trainer left `running` are marked failed. A daily job
makes the coming months' partitions and applies the retention (trainer/retention.py)."""
import asyncio
import logging
from datetime import datetime, timezone

import psycopg
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from schemas.settings import Settings
from store.db import database_url, migrate
from trainer.retention import partition_job
from trainer.round import recover, run_round

log = logging.getLogger(__name__)


async def _recover(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await recover(conn)


def scheduled_round(url: str, settings: Settings) -> None:
    run = asyncio.run(run_round(url, settings, trigger="schedule"))
    if run:
        log.info("scheduled round %d: %s", run.id, run.status)


def queued_rounds(url: str, settings: Settings) -> None:
    """Take operator-requested rounds, oldest first, until none is waiting."""
    while run := asyncio.run(run_round(url, settings, trigger="operator", queued=True)):
        log.info("requested round %d: %s", run.id, run.status)


def openwebui_import(url: str, settings: Settings):
    """Open WebUI's feedback, all of it every time (a repeat changes nothing); its report, or None
    when it failed (Open WebUI away, say: the next tick tries again; rounds go on regardless)."""
    from trainer.openwebui import run_import
    try:
        return asyncio.run(run_import(url, settings.openwebui_url, settings.openwebui_api_key))
    except Exception:
        log.exception("Open WebUI import failed")
        return None


def serve(settings: Settings) -> None:
    url = database_url(settings)
    migrate(url)
    asyncio.run(_recover(url))
    trigger = (CronTrigger.from_crontab(settings.train_cron, timezone="UTC") if settings.train_cron
               else IntervalTrigger(seconds=settings.train_interval_seconds, timezone="UTC"))
    scheduler = BlockingScheduler(timezone="UTC")
    # max_instances=1 + coalesce: a round that overruns its slot is not started twice or replayed
    scheduler.add_job(scheduled_round, trigger, args=(url, settings), max_instances=1, coalesce=True,
                      id="round")
    scheduler.add_job(queued_rounds, IntervalTrigger(seconds=settings.queue_poll_seconds, timezone="UTC"),
                      args=(url, settings), max_instances=1, coalesce=True, id="queued")
    scheduler.add_job(partition_job, IntervalTrigger(seconds=settings.partition_job_seconds, timezone="UTC"),
                      args=(url, settings), max_instances=1, coalesce=True, id="partitions",
                      next_run_time=datetime.now(timezone.utc))  # and once at start-up
    if settings.openwebui_url and settings.openwebui_api_key and settings.openwebui_import_seconds:
        scheduler.add_job(openwebui_import, IntervalTrigger(seconds=settings.openwebui_import_seconds, timezone="UTC"),
                          args=(url, settings), max_instances=1, coalesce=True, id="openwebui")
    log.info("trainer up: rounds tried %s, training on %d new feedback events (or fewer after %gs), "
             "promotion %s", settings.train_cron or f"every {settings.train_interval_seconds:g}s",
             settings.min_new_feedback, settings.max_round_interval_seconds, settings.promotion)
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        pass
