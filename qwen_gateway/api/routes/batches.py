"""``/batches`` (compatible mode): create, retrieve, list, cancel. The work is the batch worker's
(``service/batches.py``); these only store and show batches, each key its own."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from qwen_gateway.api.deps import KeyedRoute, get_gateway
from qwen_gateway.api.render.batches import batch_list, batch_object
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.api.routes.chat import read_body
from qwen_gateway.api.routes.files import list_limit
from qwen_gateway.errors import InvalidParameter, InvalidRequest
from qwen_gateway.service.validation import parse_body

router = APIRouter(route_class=KeyedRoute)

LIST_PARAMS = frozenset(
    {"after", "limit", "status", "ds_name", "create_after", "create_before", "input_file_ids"}
)
STATUSES = frozenset(
    {"validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired"}
)
# A create body is a few ids and some metadata.
CREATE_BODY_LIMIT = 64 * 1024


def _key_id(request: Request) -> str:
    return str(request.state.key.id)


@router.post("/batches")
async def create_batch(request: Request) -> Response:
    body = parse_body(await read_body(request, CREATE_BODY_LIMIT))
    if not isinstance(body, dict):
        raise InvalidRequest()
    row = await get_gateway(request).batches.create(key_id=_key_id(request), body=body)
    return JSONBytesResponse(batch_object(row))


@router.get("/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    row = await get_gateway(request).batches.get(key_id=_key_id(request), batch_id=batch_id)
    return JSONBytesResponse(batch_object(row))


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    row = await get_gateway(request).batches.cancel(key_id=_key_id(request), batch_id=batch_id)
    return JSONBytesResponse(batch_object(row))


def _moment(value: str | None, param: str) -> datetime | None:
    """DashScope's batch filters: ``YYYYMMDDhhmmss`` (a day, ``YYYYMMDD``, also taken), read as UTC."""
    if value is None:
        return None
    if not value.isdigit() or len(value) not in (8, 14):
        raise InvalidParameter(f"{param} must be a time as YYYYMMDDhhmmss.", param=param)
    try:
        return datetime.strptime(value.ljust(14, "0"), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidParameter(f"{param} is not a valid time.", param=param) from None


def _csv(value: str | None) -> list[str]:
    return [] if not value else [part.strip() for part in value.split(",") if part.strip()]


@router.get("/batches")
async def list_batches(request: Request) -> Response:
    query = request.query_params
    limit = list_limit(query, LIST_PARAMS)
    statuses = _csv(query.get("status"))
    for status in statuses:
        if status not in STATUSES:
            raise InvalidParameter(f"Unknown batch status: {status[:32]}", param="status")
    page = await get_gateway(request).batches.page(
        key_id=_key_id(request),
        limit=limit,
        after=query.get("after") or None,
        statuses=statuses,
        ds_name=query.get("ds_name") or None,
        created_from=_moment(query.get("create_after"), "create_after"),
        created_before=_moment(query.get("create_before"), "create_before"),
        input_file_ids=_csv(query.get("input_file_ids")),
    )
    return JSONBytesResponse(batch_list(page.batches, page.has_more))
