"""The native DashScope protocol: ``POST /api/v1/services/aigc/{text,multimodal}-generation/generation``
and ``POST /api/v1/tokenizer``.

A second renderer over the same service: the request is validated into the same call compatible mode
builds (``service/requests/native.py``) and runs through the same admission, money, limits and ledger
(``routes/chat.answer``); only the shapes differ (``api/render/native.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from qwen_gateway.api.deps import KeyedRoute, get_gateway
from qwen_gateway.api.errors import request_id_of
from qwen_gateway.api.render import native as render
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.api.routes.chat import answer, read_body
from qwen_gateway.errors import ApiError
from qwen_gateway.service.events import ChatResult, ChoiceEvent
from qwen_gateway.service.media import resolve as resolve_media
from qwen_gateway.service.metrics import Timing
from qwen_gateway.service.requests.native import build_native_call, native_param
from qwen_gateway.service.tokenize import tokenize
from qwen_gateway.service.validation import ChatCall, parse_body

router = APIRouter(route_class=KeyedRoute)


async def _generation(request: Request, *, multimodal: bool) -> Response:
    timing = Timing()
    gateway = get_gateway(request)
    body = parse_body(await read_body(request, gateway.settings.max_request_bytes))
    # A full engine refuses first (see routes/chat.py).
    admission = gateway.models.admission_of(body.get("model"))
    if admission is not None:
        parameters = body.get("parameters")
        admission.refuse_if_full(parameters.get("n") if isinstance(parameters, dict) else None)
    native = build_native_call(
        body,
        gateway.models,
        request_id=request_id_of(request),
        multimodal=multimodal,
        stream=render.wants_sse(request.headers),
    )
    call = await resolve_media(native.chat, gateway.media)
    try:
        # Web search once admitted (see routes/chat.py); its one refusal, made here, named natively.
        call = gateway.search.plan(call)
    except ApiError as exc:
        exc.param = native_param(exc.param)
        raise
    native = dataclasses.replace(native, chat=call)

    def frames(ran: ChatCall, events: AsyncGenerator[ChoiceEvent, None]) -> AsyncGenerator[bytes, None]:
        return render.sse_frames(dataclasses.replace(native, chat=ran), events)

    def whole(ran: ChatCall, result: ChatResult) -> dict[str, Any]:
        return render.response_body(dataclasses.replace(native, chat=ran), result)

    return await answer(request, call, frames, whole, timing, prepare=gateway.search.apply)


@router.post("/services/aigc/text-generation/generation")
async def text_generation(request: Request) -> Response:
    return await _generation(request, multimodal=False)


@router.post("/services/aigc/multimodal-generation/generation")
async def multimodal_generation(request: Request) -> Response:
    return await _generation(request, multimodal=True)


@router.post("/tokenizer")
async def tokenizer(request: Request) -> Response:
    """Free (see ``service/tokenize.py``): the key is checked, nothing is charged."""
    gateway = get_gateway(request)
    body = parse_body(await read_body(request, gateway.settings.max_request_bytes))
    result = await tokenize(body, gateway.models)
    return JSONBytesResponse(render.tokenizer_body(result, request_id_of(request)))
