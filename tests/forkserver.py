"""A template process for the servers the tests start (``python -m tests.forkserver SOCKET``).

Every ``qwen-gateway serve`` a test starts spends ~5 s of CPU importing torch, transformers and
xgrammar before it loads a 2 MB checkpoint in 0.1 s, and the suite starts dozens of them. This process
imports those modules once, then forks a child per request that runs ``python -m qwen_gateway ARGS``
exactly as the interpreter would (``runpy`` with ``alter_sys``, the same ``SystemExit`` and
traceback handling, a normal interpreter shutdown), with the request's working directory,
environment and log file. The child is the real server: nothing of the product is replaced.

Only the test side decides when forking is equivalent to a fresh interpreter (``tests/support.py``:
the environment differs from this process's own only in ``QWEN_GATEWAY_*`` variables, which are read
when the server's settings are built, never at import time); anything else gets a plain subprocess.

Protocol, on a Unix socket: a client sends one JSON line ``{"argv", "cwd", "env", "log"}`` (or
``"stdout"`` and ``"stderr"`` paths instead of ``"log"``) and reads
``<pid>\\n``; the connection stays open and later carries ``<returncode>\\n`` (negative for a signal,
as ``subprocess`` reports it) when the child exits. The process exits when its stdin closes (the test
worker that started it is gone). It is single-threaded, so a fork never copies a lock held by another
thread.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
from typing import Any

# What a server start imports before it loads a checkpoint (the costly part), plus the Qwen modeling
# modules the tiny checkpoints use. A module that fails to import here (torchvision missing for a VL
# processor, say) is simply left to the child, which reports it as a fresh process would.
PRELOAD = (
    "torch",
    "transformers",
    "xgrammar",
    "qwen_gateway.cli",
    "qwen_gateway.server",
    "qwen_gateway.engines.local.engine",
    "qwen_gateway.engines.openai.engine",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
)


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def serve(path: str) -> dict[str, Any]:
    """Accept spawn requests until stdin closes. Returns only in a forked child, with its request."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    children: dict[int, socket.socket] = {}
    pending: dict[socket.socket, bytes] = {}
    print("ready", flush=True)
    while True:
        # Children are reaped on a short tick rather than on SIGCHLD: a signal handler would run in
        # the middle of a fork.
        for key, _ in selector.select(timeout=0.05):
            if key.data == "stdin":
                if not sys.stdin.buffer.read1(4096):
                    raise SystemExit(0)
            elif key.data == "accept":
                conn, _ = listener.accept()
                pending[conn] = b""
                selector.register(conn, selectors.EVENT_READ, "request")
            else:
                conn = key.fileobj  # type: ignore[assignment]
                data = conn.recv(65536)
                if not data:
                    selector.unregister(conn)
                    pending.pop(conn, None)
                    conn.close()
                    continue
                pending[conn] += data
                if not pending[conn].endswith(b"\n"):
                    continue
                request = json.loads(pending.pop(conn))
                selector.unregister(conn)
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    listener.close()
                    conn.close()
                    for other in (*children.values(), *pending):
                        other.close()
                    return request  # type: ignore[no-any-return]
                children[pid] = conn
                conn.sendall(f"{pid}\n".encode())
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                conn.close()


def become(request: dict[str, Any]) -> None:
    """Turn this forked child into ``python -m qwen_gateway ARGS`` started as the request says."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # A server writes both streams to its log; a CLI command keeps them apart (stdout, stderr).
    # (A log opened once for both, so the two streams share one file offset, as with stderr=STDOUT.)
    paths = [request["log"]] * 2 if "log" in request else [request["stdout"], request["stderr"]]
    outs = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for path in dict.fromkeys(paths)]
    for fd, out in zip((1, 2), outs * 2 if len(outs) == 1 else outs, strict=True):
        os.dup2(out, fd)
    for out in outs:
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["-m", *request["argv"][1:]]  # argv[0] is set by runpy to the module's path


if __name__ == "__main__":
    _preload()
    child = serve(sys.argv[1])
    become(child)
    # Left to propagate, as under ``python -m``: SystemExit sets the exit code, anything else prints its
    # traceback and exits 1, and the interpreter's shutdown (thread joins, atexit) runs as usual.
    runpy.run_module("qwen_gateway", run_name="__main__", alter_sys=True)
