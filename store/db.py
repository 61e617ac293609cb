"""Where the database is, and how its schema gets there.

With no `DATABASE_URL` an embedded PostgreSQL (pgserver, a real server in a wheel) lives in the
data directory; processes that share the directory share the server. Migrations are numbered
`.sql` files applied in order, each in its own transaction, under the `migrate` advisory lock
(store/locks.py) so that replicas starting together apply each one exactly once.
"""
import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from schemas.errors import Unavailable
from schemas.settings import Settings
from store import partitions
from store.locks import MIGRATE
from store.sql import fetch_one

log = logging.getLogger(__name__)

T = TypeVar("T")
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


def migrate(url: str, below: int | None = None) -> list[int]:
    """Apply the migrations this database lacks (those numbered below `below` only, when given: a
    database as an older release left it, for testing a migration); returns the numbers applied
    (idempotent)."""
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
                if number in done or (below is not None and number >= below):
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                 (number, name))
                log.info("applied migration %03d_%s", number, name)
                applied.append(number)
            if below is None:
                partitions.ensure_ahead(conn)  # the coming months, at every start-up
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE,))
    return applied


async def ping(conn) -> None:
    """Raises unless the database answers (readiness)."""
    await fetch_one(conn, "ping")


# --- the online side's way to the database ------------------------------------------------------

def _alive(conn: psycopg.AsyncConnection) -> bool:
    """Whether a pooled, idle connection still has a server, without a round trip: libpq reads
    what the socket holds (a server that shut down left a goodbye and then end-of-file there; the
    second read sees the end). Costs a microsecond, where a `SELECT` would cost a round trip."""
    try:
        conn.pgconn.consume_input()
        conn.pgconn.consume_input()
    except psycopg.OperationalError:
        return False
    return conn.pgconn.status == psycopg.pq.ConnStatus.OK


def _broken(conn: psycopg.AsyncConnection) -> bool:
    return conn.closed or conn.broken or conn.pgconn.status != psycopg.pq.ConnStatus.OK


class Database:
    """A connection pool that never lends a dead connection, fails fast while the server is
    away, and is whole again within a moment of its return.

    - A borrowed connection is checked locally first (`_alive`); a dead one (the server
      restarted since it was last used) is dropped and the next one taken, so a restart costs
      no request.
    - A connection that breaks while in use, or a pool that cannot lend one within `timeout`,
      starts a probe: a plain connection attempt every `probe_interval` seconds. While the probe
      fails, `connection()` raises `Unavailable` at once instead of waiting. When it connects,
      the pool is replaced by a fresh one (the old one's reconnect backoff may have grown to
      minutes) and `on_recovered` callbacks run.
    - Every driver error about the connection itself becomes `Unavailable` (503, Retry-After).
    The object has the two members of `AsyncConnectionPool` the service uses: `connection()` and
    `conninfo`."""

    def __init__(self, url: str, *, min_size: int = 2, max_size: int = 16, timeout: float = 1.0,
                 probe_interval: float = 0.25):
        self.conninfo = url
        self.min_size, self.max_size, self.timeout, self.probe_interval = min_size, max_size, timeout, probe_interval
        self.pool = self._new_pool()
        self.available = True
        self.recoveries = 0
        self.on_recovered: list = []
        self._probe: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(self.conninfo, open=False, min_size=self.min_size, max_size=self.max_size,
                                   timeout=self.timeout, kwargs={"autocommit": True})

    async def open(self, timeout: float = 30) -> None:
        await self.pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.pool.close()

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
        pool, conn = await self._borrow(timeout)
        try:
            yield conn
        except (psycopg.OperationalError, Unavailable) as e:
            if _broken(conn):
                self.lost(e)
            if isinstance(e, Unavailable):
                raise
            raise Unavailable("the database is not reachable right now; retry shortly") from e
        finally:
            await pool.putconn(conn)  # a pool replaced since closes it

    async def _borrow(self, timeout: float | None) -> tuple[AsyncConnectionPool, psycopg.AsyncConnection]:
        if not self.available:
            raise Unavailable("the database is not reachable right now; retry shortly")
        for _ in range(self.max_size + 2):
            pool = self.pool
            try:
                conn = await pool.getconn(timeout)
            except PoolClosed:  # replaced while we waited: ask the new one
                continue
            except PoolTimeout as e:
                self.lost(e, renew=False)
                raise Unavailable("the database is not reachable right now; retry shortly") from e
            if _alive(conn):
                return pool, conn
            await pool.putconn(conn)  # dead: the pool drops it and opens another
            self.lost("a pooled connection's server went away")  # restarted, or gone: find out which
        raise Unavailable("the database is not reachable right now; retry shortly")

    def lost(self, error: BaseException | None = None, *, renew: bool = True) -> None:
        """Something failed that a live server would not have failed: find out, fast. `renew`:
        connections broke, so the pool is replaced once the server answers (a pool that only
        ran out of time is kept when the server answers at once)."""
        if self._probe is None or self._probe.done():
            log.warning("database connection lost (%s); probing", error or "no answer")
            self._probe = asyncio.get_running_loop().create_task(self._recover(renew))

    async def _recover(self, renew: bool) -> None:
        fresh = None
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=2)
                async with conn:
                    await conn.execute("SELECT 1")
                if renew:
                    fresh = self._new_pool()
                    await fresh.open(wait=True, timeout=5)
                break
            except (psycopg.OperationalError, PoolTimeout) as e:
                if fresh is not None:
                    await fresh.close()
                    fresh = None
                if self.available:
                    log.warning("database unreachable: %s", e)
                self.available, renew = False, True
                await asyncio.sleep(self.probe_interval)
        if fresh is not None:
            old, self.pool = self.pool, fresh
            closing = asyncio.get_running_loop().create_task(old.close(timeout=5))
            self._closing.add(closing)  # held until done: a task nobody holds may be collected
            closing.add_done_callback(self._closing.discard)
            log.warning("database reachable again; connection pool renewed")
        self.available = True
        self.recoveries += 1
        for callback in self.on_recovered:
            callback()

    async def retrying(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """`work(conn)` once more on another connection when its connection broke under it (a
        read, or a write that is safe to repeat); not while the server is known to be away."""
        try:
            async with self.connection() as conn:
                return await work(conn)
        except Unavailable:
            if not self.available:
                raise
        async with self.connection() as conn:
            return await work(conn)
