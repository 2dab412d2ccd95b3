"""How a stream's frames go out: several frames made together are one write, and a frame made alone
goes out at once (never held for a later one). Real server on loopback, read with a raw socket so
that each write of the server is seen as one chunk of the chunked body (uvicorn writes one chunk per
ASGI ``http.response.body`` message); FAKE engines set the pace (tests.fakes).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.fakes import FaultyEngine, GatedEngine
from tests.unit.api.test_inproc_server import ledger, serve_fake

TIMEOUT = 30.0  # seconds; a bound for a hung server only


class RawStream:
    """One streamed chat completion over a plain socket, read chunk by chunk."""

    def __init__(self, base: str, key: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        body = json.dumps(
            {"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        ).encode()
        self.sock.sendall(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        self.buffer = b""
        head = self._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"transfer-encoding: chunked" in head.lower(), head

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buffer += data
        part, _, self.buffer = self.buffer.partition(marker)
        return part

    def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            assert data, "connection closed"
            self.buffer += data
        part, self.buffer = self.buffer[:size], self.buffer[size:]
        return part

    def chunk(self) -> bytes | None:
        """The next chunk (one write of the server), None at the end of the body."""
        size = int(self._until(b"\r\n").split(b";")[0], 16)
        data = self._exactly(size + 2)[:-2]
        return data if size else None

    def close(self) -> None:
        self.sock.close()


def _frames(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n\n"), data  # a write holds whole frames only
    return data.split(b"\n\n")[:-1]


def test_frames_made_together_go_out_in_fewer_writes(tmp_path: Path) -> None:
    # 20 tokens at once: the renderer makes every frame without waiting for anything.
    with serve_fake(tmp_path, FaultyEngine(20, fail=False)) as (base, key, _):
        stream = RawStream(base, key)
        chunks = []
        while (chunk := stream.chunk()) is not None:
            chunks.append(chunk)
        stream.close()
    frames = [frame for chunk in chunks for frame in _frames(chunk)]
    data = [json.loads(f[6:]) for f in frames if f.startswith(b"data: {")]
    assert frames[-1] == b"data: [DONE]"
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in data if d["choices"]) == "".join(
        f"tok{i} " for i in range(20)
    )
    # 20 content frames, the role and finish frames, the usage frame and [DONE]: far fewer writes.
    assert len(frames) >= 23
    assert len(chunks) < len(frames) // 2, [len(_frames(c)) for c in chunks]


def test_a_frame_made_alone_goes_out_before_the_next_exists(tmp_path: Path) -> None:
    engine = GatedEngine(4)
    with serve_fake(tmp_path, engine) as (base, key, gateway):
        stream = RawStream(base, key)
        seen = b""
        for i in range(4):
            # tok{i} must arrive while the engine holds tok{i+1} back: were it waiting for a later
            # frame, this read would hang (and time out).
            while f"tok{i} ".encode() not in seen:
                chunk = stream.chunk()
                assert chunk is not None
                assert f"tok{i + 1} ".encode() not in chunk
                seen += chunk
            if i < 3:
                engine.release()
        rest = b""
        while (chunk := stream.chunk()) is not None:
            rest += chunk
        stream.close()
        assert rest.endswith(b"data: [DONE]\n\n")
        (row,) = ledger(gateway)
        assert (row.status, row.completion_tokens) == ("ok", 4)


def test_a_client_gone_mid_stream_stops_the_engine_and_is_charged_for_its_tokens(tmp_path: Path) -> None:
    engine = GatedEngine(10)
    with serve_fake(tmp_path, engine) as (base, key, gateway):
        stream = RawStream(base, key)
        seen = b""
        for token in (b"tok0 ", b"tok1 "):
            while token not in seen:
                chunk = stream.chunk()
                assert chunk is not None
                seen += chunk
            if token == b"tok0 ":
                engine.release()
        stream.close()  # hang up while the engine waits before tok2
        deadline = time.monotonic() + TIMEOUT
        while engine.active or not (rows := ledger(gateway)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (row,) = rows
        assert (row.status, row.prompt_tokens, row.completion_tokens) == ("cancelled", 7, 2)


def test_keepalives_fill_a_silence_between_two_tokens(tmp_path: Path) -> None:
    engine = GatedEngine(2)
    with serve_fake(tmp_path, engine) as (base, key, _):  # keep-alive every 0.3 s
        stream = RawStream(base, key)
        seen = b""
        while b"tok0 " not in seen:
            chunk = stream.chunk()
            assert chunk is not None
            seen += chunk
        # The engine holds tok1 back: the next writes are comments only.
        comments = 0
        while comments < 2:
            chunk = stream.chunk()
            assert chunk is not None and set(_frames(chunk)) == {b": keep-alive"}, chunk
            comments += len(_frames(chunk))
        engine.release()
        rest = b""
        while (chunk := stream.chunk()) is not None:
            rest += chunk
        stream.close()
    assert b"tok1 " in rest and rest.endswith(b"data: [DONE]\n\n")
