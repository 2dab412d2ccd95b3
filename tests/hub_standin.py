"""HubStandIn: a real HTTP server on loopback standing in for the Hugging Face hub (this machine cannot
reach the hub), pointed at with ``HF_ENDPOINT``.

It answers the two requests ``hf_hub_download`` makes for a file, as the hub does for an LFS file:
``HEAD`` and ``GET`` of ``/{repo}/resolve/{revision}/{filename}``, with ``X-Repo-Commit``, an ``ETag``
(the file's sha256), ``Content-Length`` and byte ranges. It serves local files (e.g. the tiny Qwen GGUF)
under the repo paths a test gives it, and records every request so a test can count them. Anything else
is a 404 with the hub's ``X-Error-Code`` header.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class HubStandIn:
    """``with HubStandIn({"Org/Repo/file.gguf": path}) as hub:`` then ``HF_ENDPOINT=hub.url``."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = {name: (path, _sha256(path)) for name, path in files.items()}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def gets(self, suffix: str) -> int:
        """How many GET requests asked for a path ending in ``suffix``."""
        with self._lock:
            return sum(1 for method, path in self.requests if method == "GET" and path.endswith(suffix))

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def _lookup(self, path: str) -> tuple[Path, str] | None:
        # /{org}/{repo}/resolve/{revision}/{filename}
        parts = path.split("?", 1)[0].strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        return self.files.get("/".join([parts[0], parts[1], *parts[4:]]))


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            hub._record(self.command, self.path)
            found = hub._lookup(self.path)
            if found is None:
                self.send_response(HTTPStatus.NOT_FOUND)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, sha = found
            size = path.stat().st_size
            start, end = 0, size - 1
            match = _RANGE.match(self.headers.get("Range", "")) if body else None
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else size - 1
            self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
            self.send_header("X-Repo-Commit", _COMMIT)
            self.send_header("ETag", f'"{sha}"')
            self.send_header("Accept-Ranges", "bytes")
            # The hub's file server names the file (hf's progress bar shows it instead of the URL).
            served = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
            self.send_header("Content-Disposition", f'attachment; filename="{served}";')
            self.send_header("Content-Length", str(end - start + 1))
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not body:
                return
            with path.open("rb") as fh:
                fh.seek(start)
                left = end - start + 1
                while left > 0:
                    chunk = fh.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

        def log_message(self, format: str, *args: object) -> None:
            pass  # requests are recorded in hub.requests, not printed into the test's output

    return Handler


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
