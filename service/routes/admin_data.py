"""Training data in and out, for operators: JSONL imports in TRL's formats, exports in TRL's
formats (the one derivation in store/derive.py), and per-version feedback stats."""
from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from schemas import imports
from schemas.records import ExportFormat, ImportLineError, ImportResult, StatsPublic
from service.deps import OPERATORS_ONLY, ConnDep, OperatorKey
from service.errors import ApiError
from service.routes.feedback import RESPONSES, IdempotencyKey, write_once
from store import derive, feedback

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=RESPONSES, dependencies=OPERATORS_ONLY)

MAX_LISTED_ERRORS = 20  # in the message of a refused import; `partial=true` returns them all
PARSERS = {"preferences": imports.parse_preference, "demonstrations": imports.parse_demonstration}
IMPORTERS = {"preferences": feedback.import_preferences, "demonstrations": feedback.import_demonstrations}


def refused(errors: list[ImportLineError], lines: int) -> ApiError:
    """A file with bad lines, imported all or nothing: every bad line by number, nothing committed."""
    listed = "; ".join(f"line {e.line}: {e.message}" for e in errors[:MAX_LISTED_ERRORS])
    more = f"; and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    first = errors[0]
    return ApiError(400, f"Nothing was imported: {len(errors)} of {lines} lines are invalid "
                         f"(send ?partial=true to import the valid ones). {listed}{more}",
                    param=f"lines[{first.line}]" + (f".{first.param}" if first.param else ""),
                    code="invalid_import")


async def import_jsonl(kind: Literal["preferences", "demonstrations"], request: Request, conn, operator,
                       response: Response, partial: bool, idempotency_key: str | None) -> ImportResult:
    data = await request.body()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"The body is not UTF-8 text ({e.reason} at byte {e.start}).",
                       code="invalid_encoding") from e
    rows, errors, lines = imports.parse_jsonl(text, PARSERS[kind])
    if not lines:
        raise ApiError(400, "The body holds no JSONL lines: one JSON object per line.", code="empty_import")
    if errors and not partial:
        raise refused(errors, lines)

    async def write() -> ImportResult:
        new = await IMPORTERS[kind](conn, rows=rows, author_key_id=operator.id)
        return ImportResult(kind=kind, lines=lines, imported=new, duplicates=len(rows) - new, errors=errors)

    return await write_once(conn, key=operator, idempotency_key=idempotency_key,
                            route=f"POST /v1/admin/imports/{kind}?partial={partial}", request=data,
                            response=response, model=ImportResult, write=write)


JSONL_BODY = {"requestBody": {"required": True, "description": "one JSON object per line (UTF-8)",
                              "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}
PARTIAL = Query(False, description="commit the valid lines and report the invalid ones, "
                                   "instead of refusing the whole file")


@router.post("/imports/preferences", response_model=ImportResult, openapi_extra=JSONL_BODY)
async def import_preferences(request: Request, operator: OperatorKey, conn: ConnDep, response: Response,
                             partial: bool = PARTIAL,
                             idempotency_key: IdempotencyKey = None) -> ImportResult:
    """Preference pairs as JSONL in TRL's formats: {"prompt", "chosen", "rejected"} with strings
    or conversational messages (or no "prompt" and whole conversations), optional "margin"."""
    return await import_jsonl("preferences", request, conn, operator, response, partial, idempotency_key)


@router.post("/imports/demonstrations", response_model=ImportResult, openapi_extra=JSONL_BODY)
async def import_demonstrations(request: Request, operator: OperatorKey, conn: ConnDep, response: Response,
                                partial: bool = PARTIAL,
                                idempotency_key: IdempotencyKey = None) -> ImportResult:
    """Demonstrations as JSONL in TRL's formats: {"prompt", "completion"} (strings or messages)
    or {"messages": [...]} ending in the assistant's answer."""
    return await import_jsonl("demonstrations", request, conn, operator, response, partial, idempotency_key)


@router.get("/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-ndjson": {}},
                             "description": "one JSON object per line"}})
async def export(conn: ConnDep,
                 format: ExportFormat = Query("preference", description="preference (reward model, DPO), "
                                                                        "kto, or sft"),
                 after: int = Query(0, ge=0, description="only data newer than this watermark"),
                 upto: int | None = Query(None, ge=0, description="up to this watermark; default: now")):
    """The derived training data as JSONL in TRL's formats, loadable by
    `datasets.load_dataset("json", data_files=...)`. The watermark it reads up to is in the
    `X-Feedloop-Watermark` header, to pass as `after` next time."""
    upto = await feedback.current_watermark(conn) if upto is None else upto
    if upto < after:
        raise ApiError(400, f"upto ({upto}) is below after ({after}).", param="upto", code="invalid_value")
    count = await derive.export_count(conn, format=format, after=after, upto=upto)
    # streamed as read (the connection stays this request's until the response is sent)
    lines = (derive.jsonl_line(r) async for r in derive.export_rows(conn, format=format, after=after, upto=upto))
    return StreamingResponse(
        lines, media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="feedloop-{format}.jsonl"',
                 "x-feedloop-watermark": str(upto), "x-feedloop-rows": str(count)})


@router.get("/stats", response_model=StatsPublic)
async def stats(conn: ConnDep) -> StatsPublic:
    """Per model version: requests, feedback counts by kind, thumbs-up rate, and the training
    pairs available since the last round."""
    return await derive.feedback_stats(conn)
