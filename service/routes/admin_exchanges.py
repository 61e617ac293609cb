"""What was recorded about one chat request."""
from fastapi import APIRouter

from schemas import store
from schemas.records import ExchangeRecord
from service.deps import ConnDep, OperatorKey
from service.errors import ERROR_RESPONSES

router = APIRouter(prefix="/v1/admin/exchanges", tags=["admin"], responses=ERROR_RESPONSES)


@router.get("/{response_id}", response_model=ExchangeRecord)
async def get_exchange(response_id: str, conn: ConnDep, operator: OperatorKey) -> ExchangeRecord:
    """The prompt, the parameters used, the version that answered, timings and every choice."""
    return await store.get_exchange(conn, response_id=response_id)
