"""What was recorded about chat requests: a page of them newest first, or one in full."""
from fastapi import APIRouter, Query

from schemas.records import ExchangeRecord, ExchangeSummary, ListPublic
from service.deps import OPERATORS_ONLY, ConnDep
from service.errors import ERROR_RESPONSES
from store import exchanges

router = APIRouter(prefix="/v1/admin/exchanges", tags=["admin"], responses=ERROR_RESPONSES,
                   dependencies=OPERATORS_ONLY)


@router.get("", response_model=ListPublic[ExchangeSummary])
async def list_exchanges(conn: ConnDep,
                         limit: int = Query(50, ge=1, le=500),
                         before: str | None = Query(None, min_length=1, max_length=200,
                                                    description="a response id: only requests older than it "
                                                                "(the last id of the previous page)"),
                         model_version_id: int | None = Query(None, ge=1, description="only this version's")
                         ) -> ListPublic[ExchangeSummary]:
    """Recorded requests newest first: the prompt, the version, how many choices, and the
    feedback on them counted by kind."""
    found = await exchanges.list_exchanges(conn, limit=limit, before=before, model_version_id=model_version_id)
    return ListPublic(data=found, count=len(found))


@router.get("/{response_id}", response_model=ExchangeRecord)
async def get_exchange(response_id: str, conn: ConnDep) -> ExchangeRecord:
    """The prompt, the parameters used, the version that answered, timings and every choice."""
    return await exchanges.get_exchange(conn, response_id=response_id)
