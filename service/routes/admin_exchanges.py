"""What was recorded about one chat request."""
from fastapi import APIRouter

from schemas.records import ExchangeRecord
from service.deps import OPERATORS_ONLY, ConnDep
from service.errors import ERROR_RESPONSES
from store import exchanges

router = APIRouter(prefix="/v1/admin/exchanges", tags=["admin"], responses=ERROR_RESPONSES,
                   dependencies=OPERATORS_ONLY)


@router.get("/{response_id}", response_model=ExchangeRecord)
async def get_exchange(response_id: str, conn: ConnDep) -> ExchangeRecord:
    """The prompt, the parameters used, the version that answered, timings and every choice."""
    return await exchanges.get_exchange(conn, response_id=response_id)
