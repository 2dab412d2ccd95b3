"""The admin API (``/admin/api/...``, admin keys only) and the web console's files (``/admin/``).

Every admin API route depends on :func:`require_admin`: no key or an unknown one is DashScope's 401, an
API key (not an admin key) is 403 ``AccessDenied``. Answers are JSON with ``Cache-Control: no-store``
(one of them carries a new key, shown once). The console is three static files from
``qwen_gateway/admin/``, served with a strict Content-Security-Policy: it loads nothing from elsewhere
and talks only to this API, with the admin key in an ``Authorization`` header (never a cookie, so
another site can't make the browser act as the admin).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from qwen_gateway.api.deps import get_gateway
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.api.routes.chat import read_body
from qwen_gateway.errors import InvalidParameter, ModelNotFound
from qwen_gateway.protocol.admin import CreateKeyIn, LimitsIn, PriceIn, TopUpIn
from qwen_gateway.service.admin import MAX_USAGE_DAYS, AdminService, KeyOverview
from qwen_gateway.service.keys import InvalidKeyName, InvalidKeySetting, KeyNameTaken
from qwen_gateway.service.money.meter import Meter
from qwen_gateway.service.money.prices import InvalidAmount, Price, format_money, to_micro
from qwen_gateway.service.validation import parse_body
from qwen_gateway.store.admin import AdminKeyRow, KeySpend
from qwen_gateway.store.keys import KeyRow

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "admin"
# name -> media type: the only files served, so no path from the URL ever reaches the filesystem.
CONSOLE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
API_HEADERS = {"Cache-Control": "no-store"}
# Admin bodies are small JSON objects.
MAX_BODY = 64 * 1024
DEFAULT_USAGE_DAYS = 30

M = TypeVar("M", bound=BaseModel)


async def require_admin(request: Request) -> AdminKeyRow:
    """``Authorization: Bearer qgw-admin-...``; 401 without a valid key, 403 for an API key."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    service: AdminService = get_gateway(request).admin
    return await service.authenticate(token.strip() if scheme.lower() == "bearer" else None)


# The calling admin key (FastAPI runs require_admin once per request, router dependency or not).
AdminDep = Annotated[AdminKeyRow, Depends(require_admin)]

api = APIRouter(prefix="/admin/api", dependencies=[Depends(require_admin)])
console = APIRouter()


def _answer(body: Any, status_code: int = 200) -> JSONBytesResponse:
    return JSONBytesResponse(body, status_code=status_code, headers=API_HEADERS)


async def _body(request: Request, model: type[M]) -> M:
    data = parse_body(await read_body(request, MAX_BODY))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise InvalidParameter(f"Unknown parameter: {where}.", param=where) from None
        raise InvalidParameter(f"Invalid parameter {where}: {first['msg']}.", param=where) from None


def _micro(value: str | int | float, param: str, *, positive: bool) -> int:
    try:
        micro = to_micro(value)
    except InvalidAmount as exc:
        raise InvalidParameter(f"Invalid parameter {param}: {exc}.", param=param) from None
    if micro < 0 or (positive and micro == 0):
        raise InvalidParameter(
            f"Invalid parameter {param}: must be {'positive' if positive else 'zero or more'}.", param=param
        )
    return micro


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _money(micro: int | None) -> str | None:
    return None if micro is None else format_money(micro)


def key_body(key: KeyRow, spend: KeySpend | None = None) -> dict[str, Any]:
    """A key as the admin API shows it: never the key, nor its hash."""
    body: dict[str, Any] = {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "status": "active" if key.active else "revoked",
        "created_at": _when(key.created_at),
        "revoked_at": _when(key.revoked_at),
        "metered": key.metered,
        "balance": _money(key.balance_micro),
        "balance_micro": key.balance_micro,
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
    }
    if spend is not None:
        body.update(
            requests=spend.requests,
            cost=_money(spend.cost_micro),
            cost_micro=spend.cost_micro,
            open_holds=spend.open_holds,
            held=_money(spend.held_micro),
            held_micro=spend.held_micro,
        )
    return body


def _overview_body(view: KeyOverview) -> dict[str, Any]:
    return key_body(view.key, view.spend)


def _service_errors(exc: Exception) -> InvalidParameter:
    """The key service's refusals, as 400s naming the field."""
    if isinstance(exc, KeyNameTaken | InvalidKeyName):
        return InvalidParameter(f"{exc}.", param="name")
    return InvalidParameter(f"{exc}.")


@api.get("/keys")
async def list_keys(request: Request) -> Response:
    views = await get_gateway(request).admin.overview()
    return _answer({"object": "list", "data": [_overview_body(v) for v in views]})


@api.post("/keys")
async def create_key(request: Request) -> Response:
    body = await _body(request, CreateKeyIn)
    balance = None if body.balance is None else _micro(body.balance, "balance", positive=False)
    admin = get_gateway(request).admin
    try:
        key, raw = await admin.create_key(
            body.name, balance_micro=balance, rpm_limit=body.rpm, tpm_limit=body.tpm
        )
    except (KeyNameTaken, InvalidKeyName, InvalidKeySetting) as exc:
        raise _service_errors(exc) from None
    # The one answer that carries the key itself: the console shows it once and keeps it nowhere.
    return _answer({**key_body(key, KeySpend()), "api_key": raw}, status_code=201)


@api.get("/keys/{key}")
async def show_key(key: str, request: Request) -> Response:
    return _answer(_overview_body(await get_gateway(request).admin.one(key)))


@api.post("/keys/{key}/topup")
async def top_up(key: str, request: Request) -> Response:
    body = await _body(request, TopUpIn)
    amount = _micro(body.amount, "amount", positive=True)
    admin = get_gateway(request).admin
    try:
        await admin.top_up(key, amount)
    except InvalidKeySetting as exc:
        raise _service_errors(exc) from None
    return _answer(_overview_body(await admin.one(key)))


@api.post("/keys/{key}/revoke")
async def revoke(key: str, request: Request) -> Response:
    admin = get_gateway(request).admin
    await admin.revoke(key)
    return _answer(_overview_body(await admin.one(key)))


@api.patch("/keys/{key}/limits")
async def set_limits(key: str, request: Request) -> Response:
    body = await _body(request, LimitsIn)
    limits = {
        f"{name}_limit": getattr(body, name) for name in ("rpm", "tpm") if name in body.model_fields_set
    }
    admin = get_gateway(request).admin
    try:
        await admin.set_limits(key, **limits)
    except InvalidKeySetting as exc:
        raise _service_errors(exc) from None
    return _answer(_overview_body(await admin.one(key)))


def _price_body(meter: Meter, model_id: str) -> dict[str, Any]:
    price, default = meter.price(model_id), meter.default_price(model_id)
    return {
        "id": model_id,
        "input_price": format_money(price.input_per_1k),
        "output_price": format_money(price.output_per_1k),
        "input_price_micro": price.input_per_1k,
        "output_price_micro": price.output_per_1k,
        # "override": set through this API (stored in the database); "default": the catalog's or
        # the [[models]] entry's, which a reset (DELETE) goes back to.
        "source": "override" if meter.overridden(model_id) else "default",
        "default_input_price_micro": default.input_per_1k,
        "default_output_price_micro": default.output_per_1k,
        "unit": "CNY per 1K tokens",
    }


def _served(meter: Meter, model_id: str) -> str:
    if not meter.serves(model_id):
        raise ModelNotFound(model_id)  # DashScope's 404 for a model it does not have
    return model_id


@api.get("/models")
async def prices(request: Request) -> Response:
    gateway = get_gateway(request)
    return _answer({"object": "list", "data": [_price_body(gateway.meter, m.id) for m in gateway.models]})


@api.put("/models/{model_id:path}/price")
async def set_price(model_id: str, request: Request, admin: AdminDep) -> Response:
    """Set a model's price (CNY per 1K tokens, at most 6 decimals): audited, in force for requests
    admitted from now on here and within seconds in every process sharing the database."""
    meter = get_gateway(request).meter
    _served(meter, model_id)
    body = await _body(request, PriceIn)
    price = Price(
        _micro(body.input_price, "input_price", positive=False),
        _micro(body.output_price, "output_price", positive=False),
    )
    await meter.set_price(model_id, price, admin_key_id=admin.id)
    return _answer(_price_body(meter, model_id))


@api.delete("/models/{model_id:path}/price")
async def reset_price(model_id: str, request: Request, admin: AdminDep) -> Response:
    """Back to the model's default price (audited; nothing happens when it has no override)."""
    meter = get_gateway(request).meter
    _served(meter, model_id)
    await meter.set_price(model_id, None, admin_key_id=admin.id)
    return _answer(_price_body(meter, model_id))


@api.get("/prices/history")
async def price_history(request: Request) -> Response:
    unknown = sorted(set(request.query_params) - {"limit"})
    if unknown:
        raise InvalidParameter(f"Unknown parameter: {unknown[0]}.", param=unknown[0])
    raw = request.query_params.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidParameter("Range of limit should be [1, 1000].", param="limit")
    changes = await get_gateway(request).meter.price_history(limit=int(raw))
    return _answer(
        {
            "object": "list",
            "data": [
                {
                    "model": c.model,
                    "old_input_price": format_money(c.old_input_micro),
                    "old_output_price": format_money(c.old_output_micro),
                    "new_input_price": format_money(c.new_input_micro),
                    "new_output_price": format_money(c.new_output_micro),
                    "old_input_price_micro": c.old_input_micro,
                    "old_output_price_micro": c.old_output_micro,
                    "new_input_price_micro": c.new_input_micro,
                    "new_output_price_micro": c.new_output_micro,
                    "reset": c.reset,
                    "admin_key_id": c.admin_key_id,
                    "changed_at": _when(c.changed_at),
                }
                for c in changes
            ],
        }
    )


@api.get("/usage")
async def usage(request: Request) -> Response:
    unknown = sorted(set(request.query_params) - {"days"})
    if unknown:
        raise InvalidParameter(f"Unknown parameter: {unknown[0]}.", param=unknown[0])
    raw_days = request.query_params.get("days", str(DEFAULT_USAGE_DAYS))
    if not raw_days.isdigit() or not 1 <= int(raw_days) <= MAX_USAGE_DAYS:
        raise InvalidParameter(f"Range of days should be [1, {MAX_USAGE_DAYS}].", param="days")
    admin = get_gateway(request).admin
    totals = await admin.usage(days=int(raw_days))
    names = {k.id: k.name for k in await get_gateway(request).keys.list()}
    rows = [
        {
            "day": t.day,
            "key_id": t.key_id,
            "key_name": names.get(t.key_id) if t.key_id else None,
            "model": t.model,
            "requests": t.requests,
            "prompt_tokens": t.sums["prompt_tokens"],
            "completion_tokens": t.sums["completion_tokens"],
            "cost": format_money(t.sums["cost_micro"]),
            "cost_micro": t.sums["cost_micro"],
        }
        for t in totals
    ]
    return _answer({"object": "list", "days": int(raw_days), "data": rows})


@console.get("/admin")
@console.get("/admin/")
async def console_index() -> Response:
    return _console_file("index.html")


@console.get("/admin/{name}")
async def console_asset(name: str) -> Response:
    if name not in CONSOLE_FILES:
        raise HTTPException(status_code=404)  # rendered as the usual DashScope-shaped 404
    return _console_file(name)


def _console_file(name: str) -> Response:
    return Response(
        (CONSOLE_DIR / name).read_bytes(), media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS
    )
