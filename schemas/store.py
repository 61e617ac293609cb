"""Typed, keyword-only queries over Postgres. Each takes the caller's connection, so the caller
owns the transaction and decides when a write is committed. SQL lives in `queries.sql`."""
import hashlib
import json
import secrets
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from schemas.db import load_queries
from schemas.records import (ApiKeyCreated, ApiKeyPublic, CompletionRecord, ExchangeRecord,
                             FeedbackPublic, ModelVersion, PreferencePublic, Promotion, RankingPublic,
                             TrainingRun)

Q = load_queries()


class NotFound(LookupError):
    """The row asked for does not exist (or is not the caller's to see)."""


class Conflict(ValueError):
    """The request is well-formed but contradicts the current state (HTTP 409)."""


async def _one(conn: AsyncConnection, query: str, /, **params) -> dict | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(Q[query], params)
        return await cur.fetchone()


async def _all(conn: AsyncConnection, query: str, /, **params) -> list[dict]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(Q[query], params)
        return await cur.fetchall()


def hash_key(key: str) -> str:
    # Keys are 32 random bytes: a plain digest is enough, no slow password hash needed.
    return hashlib.sha256(key.encode()).hexdigest()


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """Identical conversations hash alike, whatever key order or spacing the client used."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


# --- api keys -------------------------------------------------------------------------------

async def insert_api_key(conn, *, key: str, name: str, role: str,
                         rate_limit: int | None = None) -> ApiKeyPublic | None:
    """None when a key with this value exists already."""
    row = await _one(conn, "insert_api_key", key_hash=hash_key(key), prefix=key[:7], name=name,
                     role=role, rate_limit=rate_limit)
    return ApiKeyPublic(**row) if row else None


async def get_api_key(conn, *, key: str) -> ApiKeyPublic | None:
    row = await _one(conn, "get_api_key_by_hash", key_hash=hash_key(key))
    return ApiKeyPublic(**row) if row else None


async def take_rate_limited_request(conn, *, key_id: int, rate_limit: int) -> bool:
    """Count one request against the key's per-minute limit; False when this minute's is used up."""
    return await _one(conn, "take_rate_limited_request", key_id=key_id, rate_limit=rate_limit) is not None


async def list_api_keys(conn) -> list[ApiKeyPublic]:
    return [ApiKeyPublic(**r) for r in await _all(conn, "list_api_keys")]


async def revoke_api_key(conn, *, id: int) -> ApiKeyPublic:
    row = await _one(conn, "revoke_api_key", id=id)
    if row is None:
        raise NotFound(f"no live API key with id {id}")
    return ApiKeyPublic(**row)


async def count_live_operator_keys(conn) -> int:
    return (await _one(conn, "count_live_operator_keys"))["n"]


# --- model registry -------------------------------------------------------------------------

async def insert_model_version(conn, *, kind: str, path: str, content_hash: str, status: str,
                               parent_id: int | None = None, reference_id: int | None = None,
                               reward_model_id: int | None = None, endpoint: str | None = None,
                               training_run_id: int | None = None,
                               metrics: dict | None = None) -> ModelVersion:
    row = await _one(conn, "insert_model_version", kind=kind, parent_id=parent_id,
                     reference_id=reference_id, reward_model_id=reward_model_id, path=path,
                     content_hash=content_hash, endpoint=endpoint, status=status,
                     training_run_id=training_run_id, metrics=Jsonb(metrics or {}))
    return ModelVersion(**row)


async def get_model_version(conn, *, id: int) -> ModelVersion:
    row = await _one(conn, "get_model_version", id=id)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def get_active_version(conn, *, kind: str = "policy") -> ModelVersion | None:
    row = await _one(conn, "get_active_version", kind=kind)
    return ModelVersion(**row) if row else None


async def list_serving_versions(conn) -> list[ModelVersion]:
    return [ModelVersion(**r) for r in await _all(conn, "list_serving_versions")]


async def list_model_versions(conn) -> list[ModelVersion]:
    return [ModelVersion(**r) for r in await _all(conn, "list_model_versions")]


async def set_version_status(conn, *, id: int, status: str, actor: str,
                             canary_fraction: float | None = None) -> ModelVersion:
    row = await _one(conn, "set_version_status", id=id, status=status, actor=actor,
                     canary_fraction=canary_fraction)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def insert_promotion(conn, *, version_id: int, action: str, actor: str,
                           reason: str | None = None) -> Promotion:
    return Promotion(**await _one(conn, "insert_promotion", version_id=version_id, action=action,
                                  actor=actor, reason=reason))


async def list_promotions(conn, *, limit: int = 200) -> list[Promotion]:
    return [Promotion(**r) for r in await _all(conn, "list_promotions", limit=limit)]


async def list_activations(conn, *, kind: str, limit: int = 2) -> list[dict]:
    """Versions in the order they became active, newest first."""
    return await _all(conn, "list_activations", kind=kind, limit=limit)


async def lock_version(conn, *, id: int) -> ModelVersion:
    row = await _one(conn, "lock_version", id=id)
    if row is None:
        raise NotFound(f"no model version {id}")
    return ModelVersion(**row)


async def archive_active(conn, *, kind: str) -> ModelVersion | None:
    row = await _one(conn, "archive_active", kind=kind)
    return ModelVersion(**row) if row else None


# --- training runs --------------------------------------------------------------------------

async def start_training_run(conn, *, kind: str, config: dict, trigger: str,
                             requested_by: str | None = None) -> TrainingRun:
    return TrainingRun(**await _one(conn, "start_training_run", kind=kind, config=Jsonb(config),
                                    trigger=trigger, requested_by=requested_by))


async def queue_training_run(conn, *, kind: str, config: dict, requested_by: str) -> TrainingRun:
    return TrainingRun(**await _one(conn, "queue_training_run", kind=kind, config=Jsonb(config),
                                    trigger="operator", requested_by=requested_by))


async def claim_queued_run(conn) -> TrainingRun | None:
    row = await _one(conn, "claim_queued_run")
    return TrainingRun(**row) if row else None


async def finish_training_run(conn, *, id: int, status: str, metrics: dict | None = None,
                              curves: dict | None = None, error: str | None = None,
                              watermark: int | None = None) -> TrainingRun:
    return TrainingRun(**await _one(conn, "finish_training_run", id=id, status=status,
                                    metrics=Jsonb(metrics or {}), curves=Jsonb(curves or {}),
                                    error=error, watermark=watermark))


async def set_run_version(conn, *, id: int, version_id: int) -> None:
    await conn.execute(Q["set_run_version"], {"id": id, "version_id": version_id})


async def fail_abandoned_runs(conn) -> list[int]:
    return [r["id"] for r in await _all(conn, "fail_abandoned_runs")]


async def last_round_watermark(conn) -> int:
    row = await _one(conn, "last_round_watermark")
    return row["watermark"] if row else 0


async def list_training_runs(conn, *, limit: int = 100) -> list[TrainingRun]:
    return [TrainingRun(**r) for r in await _all(conn, "list_training_runs", limit=limit)]


async def get_training_run(conn, *, id: int) -> TrainingRun:
    row = await _one(conn, "get_training_run", id=id)
    if row is None:
        raise NotFound(f"no training run {id}")
    return TrainingRun(**row)


# --- exchanges ------------------------------------------------------------------------------

async def record_exchange(conn, *, response_id: str, api_key_id: int, user: str | None,
                          messages: list[dict], params: dict, model_version_id: int, stream: bool,
                          batch_rows: int, prompt_tokens: int, queue_ms: float,
                          first_token_ms: float | None, total_ms: float,
                          choices: list[CompletionRecord]) -> None:
    """Write a request and all its choices in the caller's transaction."""
    row = await _one(conn, "insert_chat_request", response_id=response_id, api_key_id=api_key_id,
                     user_field=user, messages=Jsonb(messages), prompt_hash=prompt_hash(messages),
                     params=Jsonb(params), model_version_id=model_version_id, stream=stream,
                     batch_rows=batch_rows, prompt_tokens=prompt_tokens,
                     completion_tokens=sum(c.completion_tokens for c in choices),
                     queue_ms=queue_ms, first_token_ms=first_token_ms, total_ms=total_ms)
    async with conn.cursor() as cur:
        await cur.executemany(Q["insert_completion"],
                              [dict(c.model_dump(), request_id=row["id"]) for c in choices])


async def get_exchange(conn, *, response_id: str) -> ExchangeRecord:
    req = await _one(conn, "get_chat_request", response_id=response_id)
    if req is None:
        raise NotFound(f"no exchange {response_id}")
    choices = [CompletionRecord(**r) for r in await _all(conn, "list_completions", request_id=req["id"])]
    on = dict(request_id=req["id"])  # what users said about it (queries in feedback.sql)
    return ExchangeRecord(
        **req, user=req["user_field"], choices=choices,
        feedback=[FeedbackPublic(**r) for r in await _all(conn, "list_feedback_on_request", **on)],
        rankings=[RankingPublic(**r) for r in await _all(conn, "list_rankings_on_request", **on)],
        preferences=[PreferencePublic(**r) for r in await _all(conn, "list_preferences_on_request", **on)])


def new_api_key() -> str:
    return "fl-" + secrets.token_urlsafe(32)


async def create_api_key(conn, *, name: str, role: str, rate_limit: int | None = None,
                         key: str | None = None) -> ApiKeyCreated | None:
    """A new key (random unless given); None when the given key exists already."""
    key = key or new_api_key()
    row = await insert_api_key(conn, key=key, name=name, role=role, rate_limit=rate_limit)
    return ApiKeyCreated(**row.model_dump(), key=key) if row else None


async def requests_per_version(conn) -> dict[int, int]:
    return {r["id"]: r["requests"] for r in await _all(conn, "requests_per_version")}


async def recent_conversations(conn, *, limit: int = 1000) -> list[list[dict]]:
    """Distinct recorded prompts (conversations), newest first."""
    return [r["messages"] for r in await _all(conn, "recent_conversations", limit=limit)]
