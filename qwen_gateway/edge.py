"""The HTTP edge: limits enforced while a request is still bytes on a socket, and the listening socket.

Why a subclass of uvicorn's httptools protocol rather than another server: httptools (llhttp, in C) is
uvicorn's fast path, but it has no cap on header size or count and no read deadlines, so a 256 MB
header was parsed for minutes on the event loop (issue 6). uvicorn's h11 protocol caps the header size
(``h11_max_incomplete_event_size``) but not the count and has no read deadlines either, and parses in
pure Python; hypercorn is h11 too; granian would replace the in-process lifecycle (its own workers and
signal handling) that ``server.py`` relies on. Counting bytes before llhttp sees them, and two timers,
keep the C parser and add only a few attribute updates per request (see benchmarks/http_stack.py).

What the protocol enforces (all from :class:`~qwen_gateway.settings.Settings`):

- request line plus headers at most ``max_header_bytes`` and ``max_headers`` fields, else 431 + close;
- the head complete within ``header_timeout`` of its first byte (or of the accept), else 408 + close;
- a request body never idle for more than ``body_idle_timeout`` while the app waits for it, else close
  (the app then sees a disconnect);
- at most ``max_connections`` open connections, else 503 + close at accept.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qwen_gateway.api.render.compat import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_idle_timeout: float
    max_connections: int


def _canned(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete response written straight to the socket (no app, no request id: there is no
    request yet), in the compatible-mode error shape."""
    body = orjson.dumps(
        error_body(message=message, type_="invalid_request_error", code=code, param=None, request_id=None)
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


HEADERS_TOO_LARGE = _canned(
    431, "Request Header Fields Too Large", "RequestHeaderFieldsTooLarge", "Request header fields too large."
)
HEAD_TIMEOUT = _canned(
    408, "Request Timeout", "RequestTimeout", "The request headers took too long to arrive."
)
TOO_MANY_CONNECTIONS = _canned(
    503, "Service Unavailable", "TooManyConnections", "Too many open connections, please try again later."
)


class _TooManyHeaders(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header limits, read deadlines and a connection cap.

    Subclasses made by :func:`protocol_class` carry the limits: uvicorn instantiates the class itself.
    """

    limits: ClassVar[EdgeLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from the end of one message (or the accept) to the end of the next request's headers.
        self._in_head = True
        self._head_bytes = 0
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0
        self._refused = False

    # -- accept / close ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("refused a connection: %d open (max_connections)", len(self.connections) - 1)
            self._refuse(TOO_MANY_CONNECTIONS)
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not self._refused:
            # The one log line of a client that hung up mid-body, while queued or mid-stream (the app
            # then sees a disconnect and stops; the access log never sees such a request).
            scope = cycle.scope
            log.info(
                "request %s (%s %s): client disconnected %s",
                scope.get("state", {}).get("request_id", "-"),
                scope.get("method", "?"),
                scope.get("path", "?"),
                "mid-response" if cycle.response_started else "before the response",
            )
        super().connection_lost(exc)

    def _cancel_timers(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _refuse(self, response: bytes) -> None:
        """Answer with a canned response and close; nothing more is read from this connection."""
        self._refused = True
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            # An app task still waiting on this request must see the client as gone.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.transport.is_closing():
            return
        # Mid-response (a pipelined request behind a running one) there is no room for an answer.
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            self.transport.write(response)
        self.transport.close()

    # -- bytes in ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_head:
            self._feed(data)
            return
        self._arm_head_timer()
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self._feed(data)
            return
        # Give the parser only what the budget allows: an endless head is never buffered whole.
        self._head_bytes += room
        self._feed(data[:room])
        if self._refused:
            return
        if self._in_head:
            log.info(
                "refused a request from %s: headers over %d bytes", self._peer(), self.limits.max_header_bytes
            )
            self._refuse(HEADERS_TOO_LARGE)
            return
        self.data_received(data[room:])  # the body, or the next pipelined request's head

    def _feed(self, data: bytes) -> None:
        # uvicorn's data_received, but a refusal from a parser callback is ours to answer (431),
        # not a generic 400 with a warning.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _TooManyHeaders):
                log.info(
                    "refused a request from %s: over %d header fields", self._peer(), self.limits.max_headers
                )
                self._refuse(HEADERS_TOO_LARGE)
                return
            self._bad_request()
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            self._bad_request()
        else:
            if not self._in_head and self.cycle is not None and self.cycle.more_body:
                self._arm_body_timer()

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        log.info("%s from %s", msg, self._peer())
        self._cancel_timers()
        self._refused = True
        self.send_400_response(msg)

    # -- parser callbacks -------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_headers:
            raise _TooManyHeaders
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_fields = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body_seen = self.loop.time()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_seen = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- deadlines --------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a running response may wait for it.
            self._arm_head_timer()
            return
        # An idle keep-alive connection is uvicorn's keep-alive timer's to close, not ours: this one
        # only runs from the accept or from the first byte of a head.
        log.debug(
            "closed a connection from %s: headers not complete in %ss",
            self._peer(),
            self.limits.header_timeout,
        )
        self._refuse(HEAD_TIMEOUT)

    def _arm_body_timer(self) -> None:
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_idle_timeout, self._body_check)

    def _body_check(self) -> None:
        self._body_timer = None
        if self._in_head or self.transport.is_closing():
            return
        idle = self.loop.time() - self._body_seen
        if self.flow.read_paused:
            # We stopped reading (the app has not asked for more yet): the client is not idle.
            self._body_seen = self.loop.time()
            idle = 0.0
        if idle < self.limits.body_idle_timeout:
            self._body_timer = self.loop.call_later(self.limits.body_idle_timeout - idle, self._body_check)
            return
        log.info(
            "closed a connection from %s: request body idle for %ss",
            self._peer(),
            self.limits.body_idle_timeout,
        )
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def protocol_class(limits: EdgeLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class bound to ``limits`` (uvicorn takes a class, not an instance)."""
    return type("GatewayHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
