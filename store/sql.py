"""All of the store's SQL by name, and the three ways it is run.

Every query lives in `queries/*.sql`, opened by `-- name: NAME` and a line saying what it does,
with named `%(param)s` placeholders; they are parsed once into `Q`. Functions in this package call
`fetch_one`, `fetch_all` and `execute`, which take the caller's connection (the caller owns the
transaction and decides when a write is committed) and turn driver errors into the domain's
errors (`schemas.errors`), so no caller ever sees a raw psycopg exception for a bad value.
"""
import re
from contextlib import contextmanager
from importlib import resources
from typing import AsyncIterator, Iterator

import psycopg
from psycopg import AsyncConnection, errors as pg
from psycopg.rows import dict_row

from schemas.errors import Conflict, Invalid, Unavailable


def load_queries() -> dict[str, str]:
    """Parse every `queries/*.sql`: each query opens with `-- name: NAME` and a line describing it."""
    queries = {}
    for f in sorted(resources.files("store").joinpath("queries").iterdir(), key=lambda f: f.name):
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


Q = load_queries()


@contextmanager
def translated() -> Iterator[None]:
    """Driver errors a caller's input can cause, as domain errors; anything else propagates."""
    try:
        yield
    except pg.UniqueViolation as e:
        raise Conflict(f"that exists already ({_detail(e)})", code="already_exists") from e
    except (pg.ForeignKeyViolation, pg.RestrictViolation) as e:
        raise Conflict(f"that refers to a row that does not exist or is still referred to ({_detail(e)})") from e
    except (pg.CheckViolation, pg.NotNullViolation, pg.ExclusionViolation) as e:
        raise Invalid(f"the value breaks a rule of the data ({_detail(e)})") from e
    except (psycopg.DataError, pg.ProgramLimitExceeded) as e:  # out of range, bad text, too large
        raise Invalid(f"the value cannot be stored ({_detail(e)})") from e
    except psycopg.OperationalError as e:
        raise Unavailable("the database is not reachable right now; retry shortly") from e


def _detail(e: psycopg.Error) -> str:
    return (e.diag.message_primary or type(e).__name__) if e.diag else type(e).__name__


async def fetch_one(conn: AsyncConnection, query: str, /, **params) -> dict | None:
    with translated():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(Q[query], params)
            return await cur.fetchone()


async def fetch_all(conn: AsyncConnection, query: str, /, **params) -> list[dict]:
    with translated():
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(Q[query], params)
            return await cur.fetchall()


async def stream_all(conn: AsyncConnection, query: str, /, *, batch: int = 1000, **params) -> AsyncIterator[dict]:
    """The rows as they come, `batch` at a time through a server-side cursor (in a transaction of
    its own, or a savepoint of the caller's): for answers too big to hold at once."""
    with translated():
        async with conn.transaction():
            async with conn.cursor(name=f"stream_{query}", row_factory=dict_row) as cur:
                cur.itersize = batch
                await cur.execute(Q[query], params)
                async for row in cur:
                    yield row


async def execute(conn: AsyncConnection, query: str, /, **params) -> None:
    with translated():
        await conn.execute(Q[query], params)


async def execute_many(conn: AsyncConnection, query: str, rows: list[dict]) -> None:
    with translated():
        async with conn.cursor() as cur:
            await cur.executemany(Q[query], rows)
