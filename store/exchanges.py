"""Exchanges: each chat request with the parameters used, the version that answered, timings
and every choice (one, or a page of them newest first); what users asked lately (PPO's prompts); how much each version served."""
import hashlib
import json
from typing import Any

from psycopg.types.json import Jsonb

from schemas.errors import NotFound
from schemas.openai import completion_time
from schemas.records import (CompletionRecord, ExchangeCreate, ExchangeRecord, ExchangeSummary,
                             FeedbackPublic, PreferencePublic, RankingPublic)
from store.sql import execute, execute_many, fetch_all, fetch_one


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    """Identical conversations hash alike, whatever key order or spacing the client used."""
    canonical = json.dumps([{"role": m["role"], "content": m["content"]} for m in messages],
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


async def record_exchange(conn, **fields) -> None:
    """Write a request and all its choices (`ExchangeCreate`'s fields) in the caller's transaction;
    `client_*` are what the client said of it (schemas.records.ClientRef)."""
    await record_exchanges(conn, [ExchangeCreate(**fields)])


async def record_exchanges(conn, records: list[ExchangeCreate]) -> None:
    """Write these exchanges in the caller's transaction, one statement each, all sent before the
    first answer is read."""
    if len(records) == 1:
        await execute(conn, "insert_exchange", **_exchange_row(records[0]))
    else:
        await execute_many(conn, "insert_exchange", [_exchange_row(r) for r in records])


def _exchange_row(r: ExchangeCreate) -> dict:
    c = r.choices
    return dict(response_id=r.response_id, api_key_id=r.api_key_id, user_field=r.user,
                messages=Jsonb(r.messages), prompt_hash=prompt_hash(r.messages), params=Jsonb(r.params),
                model_version_id=r.model_version_id, stream=r.stream, batch_rows=r.batch_rows,
                prompt_tokens=r.prompt_tokens, completion_tokens=sum(x.completion_tokens for x in c),
                queue_ms=r.queue_ms, first_token_ms=r.first_token_ms, total_ms=r.total_ms,
                client_ref=r.client_ref, client_chat_id=r.client_chat_id, client_task=r.client_task,
                choice_index=[x.choice_index for x in c], text=[x.text for x in c],
                finish_reason=[x.finish_reason for x in c], choice_tokens=[x.completion_tokens for x in c],
                choice_version_id=[x.model_version_id for x in c], tool_calls=[_jsonb(x.tool_calls) for x in c],
                logprobs=[_jsonb(x.logprobs) for x in c], created_at=completion_time(r.response_id))


def _jsonb(value):
    return None if value is None else Jsonb(value)


async def get_exchange(conn, *, response_id: str) -> ExchangeRecord:
    req = await fetch_one(conn, "get_chat_request", response_id=response_id,
                          at=completion_time(response_id))
    if req is None:
        raise NotFound(f"no exchange {response_id}")
    on = dict(request_id=req["id"], exchange_at=req["created_at"])  # its rows are all in its month
    choices = [CompletionRecord(**r) for r in await fetch_all(conn, "list_completions", **on)]
    return ExchangeRecord(
        **req, user=req["user_field"], choices=choices,
        feedback=[FeedbackPublic(**r) for r in await fetch_all(conn, "list_feedback_on_request", **on)],
        rankings=[RankingPublic(**r) for r in await fetch_all(conn, "list_rankings_on_request", **on)],
        preferences=[PreferencePublic(**r) for r in await fetch_all(conn, "list_preferences_on_request", **on)])


async def list_exchanges(conn, *, limit: int = 50, before: str | None = None,
                         model_version_id: int | None = None) -> list[ExchangeSummary]:
    """Recorded requests newest first, with their feedback counted: those older than the request
    `before` names (a cursor: the last response id of the previous page), of one version when given."""
    before_id = None
    if before is not None:
        cursor = await fetch_one(conn, "get_chat_request", response_id=before, at=completion_time(before))
        if cursor is None:
            raise NotFound(f"no exchange {before} to page from", param="before")
        before_id = cursor["id"]
    rows = await fetch_all(conn, "list_chat_requests", limit=limit, before_id=before_id,
                           version_id=model_version_id)
    return [ExchangeSummary(**r) for r in rows]


async def find_client_exchange(conn, *, client_ref: str) -> dict | None:
    """The user's-turn exchange a client named `client_ref` (its response id and the client's
    conversation id), None when there is none: housekeeping calls are never matched."""
    return await fetch_one(conn, "find_client_exchange", client_ref=client_ref)


async def requests_per_version(conn) -> dict[int, int]:
    return {r["id"]: r["requests"] for r in await fetch_all(conn, "requests_per_version")}


RECENT_SCAN = 20  # requests read per prompt asked for: repeats of popular prompts are skipped


async def recent_conversations(conn, *, limit: int = 1000) -> list[list[dict]]:
    """Distinct recorded prompts (conversations), newest first, from the newest
    `RECENT_SCAN * limit` requests; a client's housekeeping calls (titles, tags...) are not among
    them."""
    return [r["messages"] for r in await fetch_all(conn, "recent_conversations", limit=limit,
                                                  scan=RECENT_SCAN * limit)]
