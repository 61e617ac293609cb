"""POST /v1/feedback, /v1/rankings, /v1/preferences: what users think of what was said.

A user key may judge only what its own key produced (operators anything); someone else's
completion gets exactly the answer an unknown one gets. With an `Idempotency-Key` header a
retried POST returns the first answer and writes nothing; the same key with a different body is
a 409. Each write commits before its 200 is sent."""
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel
from psycopg import AsyncConnection

from schemas.errors import DomainError, Unavailable
from schemas.openai import ErrorResponse
from schemas.settings import get_settings
from schemas.records import (ApiKeyPublic, FeedbackCreate, FeedbackPublic, PreferenceCreate,
                             PreferencePublic, RankingCreate, RankingPublic)
from service.deps import ConnDep, CurrentKey, DatabaseDep
from service.errors import ERROR_RESPONSES, domain_error
from store import feedback
from store.feedback import FeedbackEvent

M = TypeVar("M", bound=BaseModel)
RESPONSES = ERROR_RESPONSES | {409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}
router = APIRouter(prefix="/v1", tags=["feedback"], responses=RESPONSES)

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255,
    description="a retry with the same key returns the first answer without writing again")]


def owned_by(key: ApiKeyPublic) -> int | None:
    """Whose exchanges this key may judge: its own; an operator's, anyone's."""
    return None if key.role == "operator" else key.id


async def write_once(conn: AsyncConnection, *, key: ApiKeyPublic, idempotency_key: str | None,
                     route: str, request: bytes, response: Response, model: type[M],
                     write: Callable[[], Awaitable[M]]) -> M:
    """Run `write` in one transaction, committed before returning. With an idempotency key the
    key is claimed first (a concurrent retry waits on it), the answer stored with the write, and
    a later retry with the same request gets that answer back (`Idempotent-Replayed: true`).
    A domain error leaves the block, so the transaction rolls back before it becomes a 4xx."""
    request_hash = hashlib.sha256(route.encode() + b"\n" + request).hexdigest()
    async with conn.transaction():
        if idempotency_key is not None:
            prior = await feedback.claim_idempotency_key(conn, author_key_id=key.id, key=idempotency_key,
                                                         route=route, request_hash=request_hash,
                                                         ttl_hours=get_settings().idempotency_key_hours)
            if prior is not None:
                response.headers["Idempotent-Replayed"] = "true"
                return model.model_validate(prior)
        result = await write()
        if idempotency_key is not None:
            await feedback.save_idempotent_response(conn, author_key_id=key.id, key=idempotency_key,
                                                    response=result.model_dump(mode="json"))
    return result


def recorded_yet(app, *response_ids: str) -> None:
    """An exchange answered while the database was away is recorded from the spool moments after
    it is back: feedback on it meanwhile is a 503 to retry, not a 404."""
    if any(app.state.recorder.is_spooled(r) for r in response_ids):
        raise Unavailable("That response was answered while the database was away and is still being "
                          "recorded; retry shortly.", param="response_id", code="exchange_not_recorded_yet")


@router.post("/feedback", response_model=FeedbackPublic)
async def give_feedback(body: FeedbackCreate, key: CurrentKey, db: DatabaseDep, response: Response,
                        request: Request, idempotency_key: IdempotencyKey = None) -> FeedbackPublic:
    """Thumbs (+1/-1), a rating (1-7), a comment or a corrected answer on one completion; a
    second one of the same kind by the same key replaces the first."""
    recorded_yet(request.app, body.response_id)
    if idempotency_key is None:  # written with the events that arrive with it (service/feedback_writer.py)
        return await request.app.state.feedback_writer(FeedbackEvent(body, key.id, owned_by(key)))
    async with db.connection() as conn:
        return await write_once(
            conn, key=key, idempotency_key=idempotency_key, route="POST /v1/feedback",
            request=body.model_dump_json().encode(), response=response, model=FeedbackPublic,
            write=lambda: feedback.record_feedback(conn, feedback=body, author_key_id=key.id,
                                                   owned_by=owned_by(key)))


async def give_feedback_directly(scope, body: bytes, send) -> bool:
    """`give_feedback` for the request nearly every client sends (a body that validates, no
    Idempotency-Key), answered the same way without the framework's routing, dependencies and
    response validation: most of this route's CPU, where feedback arrives by the thousand a
    second. `Admission` (service/middleware.py) calls it with the key it checked and the body it
    read. False: any other request, left to `give_feedback`, so every refusal of a request still
    comes from one place."""
    if any(name == b"idempotency-key" for name, _ in scope["headers"]):
        return False
    try:  # as FastAPI reads a JSON body
        body = FeedbackCreate.model_validate(json.loads(body))
    except ValueError:  # not JSON, or not valid: the route says why
        return False
    app, key = scope["app"], scope["state"]["api_key"]
    scope["route"] = DIRECT_ROUTE  # the metrics' route label
    try:
        recorded_yet(app, body.response_id)
        answer = await app.state.feedback_writer(FeedbackEvent(body, key.id, owned_by(key)))
        response = Response(answer.model_dump_json(), media_type="application/json")
    except DomainError as e:
        response = domain_error(e).response()
    await response(scope, None, send)
    return True


DIRECT_ROUTE = next(r for r in router.routes if r.endpoint is give_feedback)


@router.post("/rankings", response_model=RankingPublic)
async def rank_choices(body: RankingCreate, key: CurrentKey, conn: ConnDep, response: Response,
                       request: Request, idempotency_key: IdempotencyKey = None) -> RankingPublic:
    """The choices of one response (n >= 2) best first, every choice once; an inner list is a tie.
    A ranking of K choices yields K(K-1)/2 training pairs (fewer with ties)."""
    recorded_yet(request.app, body.response_id)
    return await write_once(
        conn, key=key, idempotency_key=idempotency_key, route="POST /v1/rankings",
        request=body.model_dump_json().encode(), response=response, model=RankingPublic,
        write=lambda: feedback.record_ranking(conn, ranking=body, author_key_id=key.id,
                                              owned_by=owned_by(key)))


@router.post("/preferences", response_model=PreferencePublic)
async def prefer(body: PreferenceCreate, key: CurrentKey, conn: ConnDep, response: Response,
                 request: Request, idempotency_key: IdempotencyKey = None) -> PreferencePublic:
    """One completion preferred over another completion of the same prompt; `strength` (0-1) is
    the pair's margin."""
    recorded_yet(request.app, body.chosen.response_id, body.rejected.response_id)
    return await write_once(
        conn, key=key, idempotency_key=idempotency_key, route="POST /v1/preferences",
        request=body.model_dump_json().encode(), response=response, model=PreferencePublic,
        write=lambda: feedback.record_preference(conn, preference=body, author_key_id=key.id,
                                                 owned_by=owned_by(key)))
