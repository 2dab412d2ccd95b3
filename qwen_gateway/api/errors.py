"""Rendering of errors: the one place that turns exceptions into HTTP answers (compatible mode)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from qwen_gateway.api.render import compat, native
from qwen_gateway.api.responses import JSONBytesResponse
from qwen_gateway.errors import ApiError

log = logging.getLogger(__name__)

# Longest client-sent value (a path) echoed whole in an error message.
ECHO_LIMIT = 256


def request_id_of(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def error_response(exc: ApiError, request_id: str | None) -> JSONBytesResponse:
    return JSONBytesResponse(
        compat.api_error_body(exc, request_id), status_code=exc.status, headers=exc.headers or None
    )


def _is_native(request: Request) -> bool:
    return request.url.path.startswith(native.NATIVE_PREFIX)


def native_error_response(request: Request, exc: ApiError) -> Response:
    """A native error: the flat body, or one ``event:error`` when the request asked for SSE (as
    DashScope answers a stream it refuses; the HTTP status stays the error's own, so the SDK and any
    proxy see it)."""
    rid = request_id_of(request)
    if native.wants_sse(request.headers):
        return Response(
            native.error_event(exc, rid),
            status_code=exc.status,
            media_type=native.SSE_MEDIA_TYPE,
            headers=exc.headers or None,
        )
    return JSONBytesResponse(native.error_body(exc, rid), status_code=exc.status, headers=exc.headers or None)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if _is_native(request):
        return native_error_response(request, exc)
    return error_response(exc, request_id_of(request))


async def _http_error(request: Request, exc: Exception) -> JSONBytesResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        message = f"Request method '{request.method}' is not supported."
    elif exc.status_code == 404:
        path = request.url.path
        shown = path if len(path) <= ECHO_LIMIT else path[:ECHO_LIMIT] + "..."
        message = f"The requested URL {shown} was not found on this server."
    else:
        message = str(exc.detail)
    if _is_native(request):
        code = "NotFound" if exc.status_code == 404 else "InvalidParameter"
        native_body = native.plain_error_body(code, message, request_id_of(request))
        return JSONBytesResponse(native_body, status_code=exc.status_code, headers=exc.headers)
    body = compat.error_body(
        message=message,
        type_="invalid_request_error",
        code="NotFound" if exc.status_code == 404 else "invalid_request_error",
        param=None,
        request_id=request_id_of(request),
    )
    return JSONBytesResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client hung up before its body arrived: no traceback (a client could otherwise flood the
    # log); the HTTP edge logs the disconnect once. 499 is what proxies log for "client closed
    # request"; nobody reads it.
    log.debug("request %s: body read stopped by a disconnect", request_id_of(request))
    return Response(status_code=499)


async def _unexpected(request: Request, exc: Exception) -> JSONBytesResponse:
    # The traceback goes to the server log only; the client gets the request id to quote.
    rid = request_id_of(request)
    log.error("unhandled error in request %s", rid, exc_info=exc)
    if _is_native(request):
        native_body = native.plain_error_body("InternalError", ApiError.default_message, rid)
        return JSONBytesResponse(native_body, status_code=500, headers={"X-Request-ID": rid})
    body = compat.error_body(
        message="An internal error has occured, please try again later.",
        type_="internal_error",
        code="internal_error",
        param=None,
        request_id=rid,
    )
    # This handler runs outside RequestIdMiddleware (in Starlette's outermost layer): add the header here.
    return JSONBytesResponse(body, status_code=500, headers={"X-Request-ID": rid})


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
