"""FAKE upstream: a fault-injecting OpenAI-compatible server, for faults a real upstream can't produce
on demand (hangs, connection resets, garbage, death mid-stream) and for replaying recorded stream
shapes of other servers (tests/unit/engines/data/upstream/).

The request's ``model`` picks the behaviour (see :data:`MODES`), and ``stream`` whether it answers as a
stream or as one JSON answer (the modes that have both; replays read ``<name>.json`` for the whole
answer when it exists); ``GET .../models`` lists every mode
with a ``max_model_len``, as vLLM does. It is a raw asyncio HTTP/1.1 server with keep-alive and chunked
streaming (no framework, so it is also fast enough to be a benchmark's upstream), run on its own event
loop in a thread of the test process, which lets a test look at what it received.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORDED = Path(__file__).parent / "unit" / "engines" / "data" / "upstream"
CONTEXT = 4096  # the max_model_len every mode reports
UPSTREAM_SECRET = "UPSTREAM-INTERNAL-DETAIL-42"  # in error bodies: must never reach a client

MODES = (
    "ok",  # 5 tokens, finish, usage (stream false: one answer with its usage)
    "no-usage",  # 5 tokens and finish, but no usage chunk (stream false: an answer without usage)
    "hang",  # reads the request, never answers
    "headers-then-hang",  # answers 200 headers, never an event
    "reset",  # closes the connection with a TCP reset on receiving the request
    "garbage",  # 200 with data lines that are not JSON (stream false: a body that is not JSON)
    "die",  # 3 tokens, then the connection is reset (no finish; stream false: half the answer)
    "slow",  # a token every 20 ms, 500 of them (for disconnects)
    "held",  # streams "ok" only once the test lets it (release()), one request per release, in order
    "status-500",
    "status-429",
    "status-400",
)


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1764590000,
        "model": "fake",
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FaultyUpstream:
    """FAKE fault-injecting upstream on 127.0.0.1 (see the module docstring)."""

    tokens: int = 5
    force_mode: str | None = None  # every chat request behaves so, whatever its model
    received: list[Received] = field(default_factory=list)
    disconnects: int = 0  # clients that went away while a stream was open or hanging
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None
    port: int = 0
    on_disconnect: Callable[[], None] | None = None
    # "held" requests: how many are being answered now, the most at once, and the permits to answer.
    in_flight: int = 0
    max_in_flight: int = 0
    _permits: asyncio.Queue[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultyUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def main() -> None:
                self._permits = asyncio.Queue()
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                await self._server.serve_forever()

            try:
                loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="faulty-upstream")
        self._thread.start()
        assert ready.wait(10), "fake upstream did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(10)

    def release(self) -> None:
        """Let the longest-waiting "held" request answer (or the next one to arrive)."""
        assert self._loop is not None and self._permits is not None
        self._loop.call_soon_threadsafe(self._permits.put_nowait, None)

    def bodies(self, model: str) -> list[Any]:
        return [r.body for r in self.received if isinstance(r.body, dict) and r.body.get("model") == model]

    # -- HTTP ------------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
                }
                length = int(headers.get("content-length", "0"))
                raw = await reader.readexactly(length) if length else b""
                body = json.loads(raw) if raw else None
                # (Received keeps the query a base URL may carry; the route is the path without it.)
                if method == "GET" and path.partition("?")[0].endswith("/models"):
                    data = [{"id": m, "object": "model", "max_model_len": CONTEXT} for m in self.modes()]
                    self._respond(writer, 200, json.dumps({"object": "list", "data": data}).encode())
                    await writer.drain()
                    continue
                self.received.append(Received(path, headers, body))
                model = body.get("model") if isinstance(body, dict) else None
                mode = self.force_mode or model
                if isinstance(body, dict) and body.get("stream") is not True and self._whole_mode(mode):
                    keep = await self._whole(writer, mode)  # a whole answer: stream false
                else:
                    keep = await self._chat(reader, writer, mode)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()

    def _completion(self, usage: bool = True) -> bytes:
        text = "".join(f"tok{i} " for i in range(self.tokens))
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1764590000,
            "model": "fake",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
        }
        if usage:
            body["usage"] = {
                "prompt_tokens": 7,
                "completion_tokens": self.tokens,
                "total_tokens": 7 + self.tokens,
            }
        return json.dumps(body).encode()

    @staticmethod
    def _whole_mode(mode: str | None) -> bool:
        """Modes with a non-streamed form (the others behave the same whatever ``stream`` says, except
        the stream-only ones, "slow" and replays without a recorded whole answer, which stream anyway,
        as some proxies do)."""
        if mode is not None and mode.startswith("replay-"):
            return (RECORDED / f"{mode[7:]}.json").exists()
        return mode in {"ok", "no-usage", "garbage", "die"}

    async def _whole(self, writer: asyncio.StreamWriter, mode: str | None) -> bool:
        if mode == "ok":
            self._respond(writer, 200, self._completion())
        elif mode == "no-usage":
            self._respond(writer, 200, self._completion(usage=False))
        elif mode == "garbage":
            self._respond(writer, 200, b"<html>this is not json</html>")
        elif mode == "die":  # half the answer, then a TCP reset
            body = self._completion()
            head = f"HTTP/1.1 200 X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body[: len(body) // 2])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        else:
            assert mode is not None
            self._respond(writer, 200, (RECORDED / f"{mode[7:]}.json").read_bytes())
        await writer.drain()
        return True

    def modes(self) -> list[str]:
        return [*MODES, *(f"replay-{p.stem}" for p in sorted(RECORDED.glob("*.sse")))]

    @staticmethod
    def _respond(
        writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )

    async def _gone(self, reader: asyncio.StreamReader) -> None:
        """Wait until the client closes the connection (counted as a disconnect)."""
        await reader.read()
        self.disconnects += 1
        if self.on_disconnect is not None:
            self.on_disconnect()

    async def _chat(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, model: str | None
    ) -> bool:
        if model == "hang":
            await self._gone(reader)
            return False
        if model == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if model == "held":
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            assert self._permits is not None
            try:
                await self._permits.get()
            finally:
                self.in_flight -= 1  # before the answer: the gateway can't have seen its end yet
            model = "ok"
        if model is not None and model.startswith("status-"):
            status = int(model.split("-")[1])
            error = {"error": {"message": f"upstream says no: {UPSTREAM_SECRET}", "type": "x"}}
            # A 429 says how long to back off, as vLLM's and DashScope's rate limits do.
            extra = {"Retry-After": "7"} if status == 429 else {}
            self._respond(writer, status, json.dumps(error).encode(), extra)
            await writer.drain()
            return True
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        if model == "headers-then-hang":
            await writer.drain()
            await self._gone(reader)
            return False

        def send(data: bytes) -> None:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        if model == "garbage":
            send(b"data: <html>this is not json</html>\n\n")
        elif model is not None and model.startswith("replay-"):
            send((RECORDED / f"{model[7:]}.sse").read_bytes())
        elif model == "die":
            for i in range(3):
                send(_chunk({"content": f"tok{i} "}))
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        elif model == "slow":
            gone = asyncio.ensure_future(self._gone(reader))
            try:
                for i in range(500):
                    if gone.done():
                        return False
                    send(_chunk({"content": f"tok{i} "}))
                    await writer.drain()
                    await asyncio.sleep(0.02)
            except ConnectionError:
                return False
            finally:
                gone.cancel()
            send(_chunk({}, "length"))
        else:
            send(_chunk({"role": "assistant", "content": ""}))
            for i in range(self.tokens):
                send(_chunk({"content": f"tok{i} "}))
            send(_chunk({}, "stop"))
            if model != "no-usage":
                usage = {
                    "prompt_tokens": 7,
                    "completion_tokens": self.tokens,
                    "total_tokens": 7 + self.tokens,
                }
                send(_chunk(None, usage=usage))
        send(b"data: [DONE]\n\n")
        send(b"")  # the last chunk of the chunked body
        await writer.drain()
        return True


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
