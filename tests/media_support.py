"""A real loopback media server and raw listeners that count connections, for the media tests (the
fetcher's unit tests and the server-level ones)."""

from __future__ import annotations

import contextlib
import http.server
import io
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def png_bytes(width: int = 40, height: int = 30, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "blue").save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height``: signature, IHDR, a few bytes of IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class MediaServer:
    """``http.server`` on 127.0.0.1 serving fixed routes; ``release`` ends every stalled answer."""

    port: int
    files: dict[str, tuple[str, bytes]]
    release: threading.Event
    hits: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    max_active: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(server: MediaServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            server.hits[parts.path] = server.hits.get(parts.path, 0) + 1
            query = parse_qs(parts.query)
            if parts.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif parts.path.startswith("/chain/"):
                n = int(parts.path.rsplit("/", 1)[1])
                self.send_response(307)
                self.send_header("Location", f"/chain/{n - 1}" if n > 0 else "/img.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif parts.path == "/stall":
                # Headers and a first part of the body, then nothing until the test ends.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.wfile.write(png_bytes()[:16])
                self.wfile.flush()
                server.release.wait()
            elif parts.path == "/hold":
                # Answered once the test sets ``release``; counts how many are held at once.
                with server.lock:
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                server.release.wait()
                with server.lock:
                    server.active -= 1
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif parts.path == "/trickle":
                # A byte every 50 ms, forever: each read is quick, only the total deadline ends it.
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                with contextlib.suppress(OSError):
                    for byte in png_bytes() * 100:
                        if server.release.wait(0.05):
                            break
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
            elif parts.path == "/endless":
                # No Content-Length (HTTP/1.0, body until close): the fetcher must stop at its cap.
                self.send_response(200)
                self.end_headers()
                chunk = png_bytes() + b"\x00" * 65536
                with contextlib.suppress(OSError):
                    while not server.release.is_set():
                        self.wfile.write(chunk)
            elif parts.path == "/gzip":
                body = zlib.compress(png_bytes())
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif parts.path in server.files:
                ctype, body = server.files[parts.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    return Handler


class CountingListener:
    """A raw listening socket nobody accepts on; :meth:`connections` counts what reached it."""

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self._accepted = 0

    def connections(self) -> int:
        # A loopback connect completes its handshake in the kernel before connect() returns, so any
        # connection the fetcher made is already in the accept queue when the fetch has returned.
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return self._accepted
            conn.close()
            self._accepted += 1

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def running_media_server() -> Iterator[MediaServer]:
    """A :class:`MediaServer` on a free loopback port, for the ``with`` block."""
    release = threading.Event()
    state = MediaServer(port=0, files={}, release=release)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    state.files.update(
        {
            "/img.png": ("image/png", png_bytes()),
            "/photo.jpg": ("image/png", jpeg_bytes()),  # declared type is wrong on purpose
            "/text.png": ("image/png", b"this is not an image at all" * 4),
            "/big.png": ("image/png", png_bytes() + b"\x00" * 200_000),
        }
    )
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
