"""Where the database is, and how its schema gets there.

With no `DATABASE_URL` an embedded PostgreSQL (pgserver, a real server in a wheel) lives in the
data directory; processes that share the directory share the server. Migrations are numbered
`.sql` files applied in order, each in its own transaction, under the `migrate` advisory lock
(store/locks.py) so that replicas starting together apply each one exactly once.
"""
import logging
import re
from importlib import resources

import psycopg

from schemas.settings import Settings
from store.locks import MIGRATE
from store.sql import fetch_one

log = logging.getLogger(__name__)

_embedded = None  # keeps the pgserver handle alive for this process


def database_url(settings: Settings) -> str:
    """The configured URL, or the embedded server's (started on first use)."""
    if settings.database_url:
        return settings.database_url
    global _embedded
    if _embedded is None:
        import pgserver

        pgdata = settings.home.resolve() / "pg"
        pgdata.mkdir(parents=True, exist_ok=True)
        _embedded = pgserver.get_server(pgdata, cleanup_mode="stop")
    return _embedded.get_uri()


def migrations() -> list[tuple[int, str, str]]:
    """(number, name, sql) for every `migrations/NNN_name.sql`, in order."""
    found = []
    for f in resources.files("store").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d+)_(\w+)\.sql", f.name)
        if m:
            found.append((int(m.group(1)), m.group(2), f.read_text()))
    return sorted(found)


def migrate(url: str) -> list[int]:
    """Apply the migrations this database lacks; returns the numbers applied (idempotent)."""
    applied = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for number, name, sql in migrations():
                if number in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                 (number, name))
                log.info("applied migration %03d_%s", number, name)
                applied.append(number)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE,))
    return applied


async def ping(conn) -> None:
    """Raises unless the database answers (readiness)."""
    await fetch_one(conn, "ping")
