"""Where the database is, and how its schema gets there.

With no `DATABASE_URL` an embedded PostgreSQL (pgserver, a real server in a wheel) lives in the
data directory; processes that share the directory share the server. Migrations are numbered
`.sql` files applied in order, each in its own transaction, under an advisory lock so that
replicas starting together apply each one exactly once.
"""
import logging
import re
from importlib import resources

import psycopg

from schemas.settings import Settings

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x66656564  # advisory lock key ("feed") held while migrating
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
    for f in resources.files("schemas").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d+)_(\w+)\.sql", f.name)
        if m:
            found.append((int(m.group(1)), m.group(2), f.read_text()))
    return sorted(found)


def migrate(url: str) -> list[int]:
    """Apply the migrations this database lacks; returns the numbers applied (idempotent)."""
    applied = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
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
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied


def load_queries() -> dict[str, str]:
    """Parse every `queries/*.sql`: each query opens with `-- name: NAME` and a line describing it."""
    queries = {}
    for f in sorted(resources.files("schemas").joinpath("queries").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".sql"):
            for name, sql in _parse_queries(f.read_text()).items():
                if name in queries:
                    raise ValueError(f"query {name} is defined twice")
                queries[name] = sql
    return queries


def _parse_queries(text: str) -> dict[str, str]:
    queries, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(r"--\s*name:\s*(\w+)", line)
        if m:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = m.group(1), []
        elif name and not line.startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries
