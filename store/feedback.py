"""Feedback in: thumbs, ratings, comments, corrections, rankings, preferences and imports, each
written in the caller's transaction (SQL in `queries/feedback.sql`); idempotency keys; and the
watermark that says which of it a round may read. The training data derived from it is in
`store/derive.py`.

Event ids and the watermark. Every feedback-like row (feedback, rankings, preferences,
demonstrations) draws its `event_id` from one sequence, and a row that changes draws a new one.
A derived pair's event is the highest event of its source rows, so "new since the last round" is
`event > watermark` whatever the rows' ages: a new thumbs-down on one answer pairs with an old
thumbs-up on another and the pair is new. Writers join a shared advisory lock before drawing an
id and keep it until they commit; `current_watermark` takes it exclusively for a moment, so every
id at or below the watermark it returns belongs to a row that is committed or rolled back for good.
"""
from datetime import datetime
from typing import NamedTuple

from psycopg import AsyncConnection, pq
from psycopg.types.json import Jsonb

from schemas.errors import Conflict, DomainError, Invalid, NotFound
from schemas.records import (CompletionRef, CompletionTarget, DemonstrationImport, FeedbackCreate,
                             FeedbackPublic, PreferenceCreate, PreferenceImport, PreferencePublic,
                             RankingCreate, RankingPublic)
from schemas.openai import completion_time
from store import locks
from store.exchanges import prompt_hash
from store.sql import execute, fetch_all, fetch_one


def _in_transaction(conn: AsyncConnection) -> None:
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        raise RuntimeError("feedback writes run inside the caller's transaction: `async with conn.transaction()`")


async def _join_event_writers(conn: AsyncConnection) -> None:
    """Before drawing event ids: held until the caller's transaction ends (see the module doc)."""
    _in_transaction(conn)
    await locks.lock_for_transaction(conn, locks.EVENTS, shared=True)


# --- the things feedback is about -----------------------------------------------------------

def _not_housekeeping(response_id: str, client_task: str | None, param: str | None) -> None:
    """A client's housekeeping call (a title, tags, follow-ups: a client task, see
    `schemas.records.ClientRef`) is not a user's conversation and is never trained on, so feedback
    on it is refused rather than kept and left out of training unseen. This check is what keeps such
    exchanges out of every training pair and demonstration; PPO's prompts leave them out in
    `recent_conversations`."""
    if client_task is not None:
        raise Invalid(f"Response '{response_id}' is a client's housekeeping call (task "
                      f"'{client_task}'), not a user's conversation; it is not trained on, so "
                      "it takes no feedback.", param=param or "response_id", code="client_task_exchange")


async def find_completion(conn, *, ref: CompletionRef, owned_by: int | None,
                          param: str | None = None) -> CompletionTarget:
    """The completion `ref` names when key `owned_by` produced it (any key's when None), to judge
    in the caller's transaction (which this joins to the event writers); NotFound otherwise,
    with one message for unknown and someone else's."""
    _in_transaction(conn)
    row = await fetch_one(conn, "find_completion", response_id=ref.response_id, choice_index=ref.choice_index,
                          owner=owned_by, at=completion_time(ref.response_id), lock=locks.EVENTS)
    _judgeable(row, ref, param)
    return CompletionTarget(**row)


def _judgeable(row: dict | None, ref: CompletionRef, param: str | None) -> None:
    """NotFound when nothing was found for `ref`; Invalid for a client's housekeeping call."""
    if row is None:
        raise NotFound(f"No completion with response_id '{ref.response_id}' and choice_index "
                       f"{ref.choice_index}.", param=param)
    _not_housekeeping(ref.response_id, row["client_task"], param)


# --- writes: one current value per (completion or response, author, kind) --------------------

async def record_feedback(conn, *, feedback: FeedbackCreate, author_key_id: int,
                          owned_by: int | None) -> FeedbackPublic:
    """Thumbs, rating, comment or correction on one completion; a repeat replaces the author's
    value of that kind (and is new data only when the value changed)."""
    [result] = await record_feedback_group(conn, [FeedbackEvent(feedback, author_key_id, owned_by)])
    if isinstance(result, DomainError):
        raise result
    return result


class FeedbackEvent(NamedTuple):
    """One `record_feedback` call's arguments."""
    feedback: FeedbackCreate
    author_key_id: int
    owned_by: int | None

    def same_row(self) -> tuple:
        """Events with equal values write the same feedback row."""
        return self.feedback.response_id, self.feedback.choice_index, self.author_key_id, self.feedback.kind


async def record_feedback_group(conn, events: list[FeedbackEvent]) -> list[FeedbackPublic | DomainError]:
    """`record_feedback` for every event in one statement: in the caller's transaction, or on an
    autocommit connection on its own (the statement is then the transaction, committed when this
    returns). An event's answer, or the error that event alone gets (an unknown or someone else's
    completion, a client's housekeeping call), writing nothing for it. No two events may write the
    same row (`FeedbackEvent.same_row`): each answer is its own write's. A database error fails the
    statement, for every event."""
    f = [e.feedback for e in events]
    rows = await fetch_all(conn, "record_feedback", response_ids=[x.response_id for x in f],
                           choice_indexes=[x.choice_index for x in f], owners=[e.owned_by for e in events],
                           ats=[completion_time(x.response_id) for x in f],
                           author_key_ids=[e.author_key_id for e in events], kinds=[x.kind for x in f],
                           values=[x.value for x in f], texts=[x.text for x in f], lock=locks.EVENTS)
    results: list[FeedbackPublic | DomainError] = []
    for event, x, row in zip(events, f, rows):
        try:
            _judgeable(None if row["completion_id"] is None else row, x, None)
        except DomainError as e:
            results.append(e)
            continue
        if row["id"] is None:  # the same value again, written by a transaction it could not see
            row = await fetch_one(conn, "get_feedback", completion_id=row["completion_id"],
                                  exchange_at=row["exchange_at"], author_key_id=event.author_key_id, kind=x.kind)
        results.append(FeedbackPublic(**{**row, "response_id": x.response_id, "choice_index": x.choice_index}))
    return results


async def record_ranking(conn, *, ranking: RankingCreate, author_key_id: int,
                         owned_by: int | None) -> RankingPublic:
    """The choices of one response best first (ties allowed): every choice exactly once."""
    _in_transaction(conn)
    request = await fetch_one(conn, "find_request", response_id=ranking.response_id, owner=owned_by,
                              at=completion_time(ranking.response_id), lock=locks.EVENTS)
    if request is None:
        raise NotFound(f"No response with id '{ranking.response_id}'.", param="response_id")
    _not_housekeeping(ranking.response_id, request["client_task"], "response_id")
    n = request["choices"]
    if n < 2:
        raise Invalid(f"Response '{ranking.response_id}' has {n} choice; a ranking orders "
                      "the choices of a response with n >= 2.", param="response_id")
    ranked = sorted(i for tier in ranking.tiers() for i in tier)
    if ranked != list(range(n)):
        raise Invalid(f"order must be a permutation of the response's {n} choices: each of "
                      f"0..{n - 1} exactly once (got {ranked}).", param="order")
    key = dict(request_id=request["id"], exchange_at=request["exchange_at"], author_key_id=author_key_id)
    row = await fetch_one(conn, "upsert_ranking", **key, ordering=Jsonb(ranking.order))
    if row is None:
        row = await fetch_one(conn, "get_ranking", **key)
    return RankingPublic(**row)


async def record_preference(conn, *, preference: PreferenceCreate, author_key_id: int,
                            owned_by: int | None) -> PreferencePublic:
    """One completion preferred over another of the same prompt; margin = strength. One current
    preference per author and pair, whichever way round."""
    chosen = await find_completion(conn, ref=preference.chosen, owned_by=owned_by, param="chosen")
    rejected = await find_completion(conn, ref=preference.rejected, owned_by=owned_by, param="rejected")
    if chosen.prompt_hash != rejected.prompt_hash:
        raise Invalid("chosen and rejected answer different prompts; a preference compares "
                      "two completions of the same conversation.", param="rejected")
    key = dict(author_key_id=author_key_id, chosen_id=chosen.id, rejected_id=rejected.id)
    row = await fetch_one(conn, "upsert_preference", **key, chosen_at=chosen.exchange_at,
                          rejected_at=rejected.exchange_at, strength=preference.strength, margin=preference.strength)
    if row is None:
        row = await fetch_one(conn, "get_preference", **key)
    return PreferencePublic(**row)


async def transaction_time(conn) -> datetime:
    """Now, as the caller's transaction sees it: a row written in it has this `updated_at`, a row a
    repeat left alone an older one."""
    _in_transaction(conn)
    return (await fetch_one(conn, "transaction_time"))["now"]


# --- idempotency ----------------------------------------------------------------------------

async def claim_idempotency_key(conn, *, author_key_id: int, key: str, route: str,
                                request_hash: str, ttl_hours: float = 24.0) -> dict | None:
    """None: the key is this request's now (store its answer with `save_idempotent_response`
    before committing). Otherwise the answer to the first request with this key, to replay.
    A request in flight with the same key is waited for. Conflict: the key was used for a
    different request. Keys are remembered for `ttl_hours`: the author's older ones are
    forgotten first, so an old key is free again and the table does not grow for ever."""
    _in_transaction(conn)
    params = dict(author_key_id=author_key_id, key=key)
    await execute(conn, "forget_idempotency_keys", author_key_id=author_key_id, ttl_seconds=ttl_hours * 3600)
    for _ in range(3):  # a claimer that rolled back leaves the key free: claim it then
        if await fetch_one(conn, "claim_idempotency_key", **params, route=route, request_hash=request_hash):
            return None
        prior = await fetch_one(conn, "get_idempotency_key", **params)
        if prior is not None:
            if (prior["route"], prior["request_hash"]) != (route, request_hash):
                raise Conflict(f"Idempotency-Key '{key}' was used for a different request; "
                               "send a new key with a new request.", param="Idempotency-Key",
                               code="idempotency_key_reused")
            return prior["response"]
    raise Conflict(f"Idempotency-Key '{key}' is in use by a concurrent request; retry.",
                   param="Idempotency-Key", code="idempotency_key_in_use")


async def save_idempotent_response(conn, *, author_key_id: int, key: str, response: dict) -> None:
    await execute(conn, "save_idempotent_response", author_key_id=author_key_id, key=key,
                  response=Jsonb(response))


# --- imports: rows already parsed (schemas/imports.py) -------------------------------------

async def import_preferences(conn, *, rows: list[PreferenceImport], author_key_id: int) -> int:
    """Store imported pairs in the caller's transaction; returns how many were new (a pair
    imported before, or twice in one file, is kept once)."""
    return await _import(conn, "insert_imported_preferences", rows, author_key_id)


async def import_demonstrations(conn, *, rows: list[DemonstrationImport], author_key_id: int) -> int:
    """Store imported demonstrations in the caller's transaction; returns how many were new."""
    return await _import(conn, "insert_imported_demonstrations", rows, author_key_id)


async def _import(conn, query: str, rows: list[PreferenceImport] | list[DemonstrationImport],
                  author_key_id: int) -> int:
    """All rows in one statement (a JSON array), each with its prompt's hash; the new ones count."""
    if not rows:
        return 0
    await _join_event_writers(conn)
    payload = [dict(r.model_dump(), prompt_hash=prompt_hash(r.prompt)) for r in rows]
    return len(await fetch_all(conn, query, author_key_id=author_key_id, rows=Jsonb(payload)))


# --- the watermark --------------------------------------------------------------------------

async def current_watermark(conn) -> int:
    """The highest event id drawn so far, once every writer that might hold one at or below it
    has finished: all data up to it is committed and will not change under that id."""
    await locks.lock(conn, locks.EVENTS)
    try:
        return (await fetch_one(conn, "last_event_id"))["event_id"]
    finally:
        await locks.unlock(conn, locks.EVENTS)


async def new_events(conn, *, after: int, upto: int) -> tuple[int, datetime | None]:
    """(how many feedback-like rows of any kind have events in (after, upto], when the oldest of
    them was written): the evidence a scheduled round waits for."""
    row = await fetch_one(conn, "count_new_events", after=after, upto=upto)
    return row["n"], row["oldest"]
