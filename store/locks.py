"""Every advisory lock and NOTIFY channel, named in one place.

Lock keys follow one scheme: the lock's short name (at most 8 ASCII bytes) read as a big-endian
integer, so `SELECT * FROM pg_locks` shows the same number everywhere and names cannot collide.
  migrate   held while migrations run, so replicas starting together apply each once
  events    feedback writers share it until they commit; the watermark takes it alone
  round     one training round at a time across every trainer replica
  initpol   serialises first starts, so only one registers the first policy
  registry  serialises rollbacks, which read the activation history before changing it
  deploy    one switch of what serves at a time (promote, canary, rollback, retarget), across
            replicas and the CLI, held while its deploy hook runs and its target is checked
  keys      serialises key revocations, so the last live operator key is never revoked
"""
from contextlib import asynccontextmanager
from typing import AsyncIterator

from psycopg import AsyncConnection

from store.sql import execute, fetch_one


def lock_key(name: str) -> int:
    raw = name.encode("ascii")
    if len(raw) > 8:
        raise ValueError(f"lock name {name!r} is longer than 8 bytes")
    return int.from_bytes(raw, "big")


MIGRATE, EVENTS, ROUND, INITIAL_POLICY, REGISTRY, DEPLOY, KEYS = map(
    lock_key, ("migrate", "events", "round", "initpol", "registry", "deploy", "keys"))
REGISTRY_CHANNEL = "feedloop_registry"  # a version's status changed: replicas re-sync


async def try_lock(conn: AsyncConnection, key: int) -> bool:
    return (await fetch_one(conn, "try_lock", key=key))["locked"]


async def lock(conn: AsyncConnection, key: int) -> None:
    await execute(conn, "lock", key=key)


async def unlock(conn: AsyncConnection, key: int) -> None:
    await execute(conn, "unlock", key=key)


@asynccontextmanager
async def holding(conn: AsyncConnection, key: int) -> AsyncIterator[bool]:
    """`async with holding(conn, ROUND) as got:` the lock for the block when `got`, else not at all."""
    got = await try_lock(conn, key)
    try:
        yield got
    finally:
        if got:
            await unlock(conn, key)


async def lock_for_transaction(conn: AsyncConnection, key: int, *, shared: bool = False) -> None:
    await execute(conn, "share_for_transaction" if shared else "lock_for_transaction", key=key)


async def notify_registry(conn: AsyncConnection, payload: str) -> None:
    await execute(conn, "notify", channel=REGISTRY_CHANNEL, payload=payload)


async def listen_registry(conn: AsyncConnection) -> None:
    # The one statement not in queries/*.sql: LISTEN takes no parameters and cannot be prepared.
    await conn.execute(f"LISTEN {REGISTRY_CHANNEL}")
