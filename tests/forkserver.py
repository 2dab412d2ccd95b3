"""A template process for the servers the tests start (``python -m tests.forkserver SOCKET``).

Every ``qwen-gateway serve`` a test starts spends ~5 s of CPU importing torch, transformers and
xgrammar before it loads a 2 MB checkpoint in 0.1 s, and the suite starts dozens of them. This process
imports those modules once, then forks a child per request that runs ``python -m qwen_gateway ARGS``
exactly as the interpreter would (``runpy`` with ``alter_sys``, the same ``SystemExit`` and
traceback handling, a normal interpreter shutdown), with the request's working directory,
environment and log file. The child is the real server: nothing of the product is replaced.

A CLI command (a request with ``stdout`` and ``stderr``) ends with the steps of the interpreter's
shutdown that a program can observe (non-daemon threads joined, ``atexit`` handlers, the standard
streams flushed), then ``os._exit``: the rest, tearing down every module and collecting the garbage,
walks the template's whole heap (torch, transformers), copying each page it writes to, which cost a
forked ``keys create`` 1.7 s of CPU after 0.15 s of work; a fresh interpreter running the command
never has that heap at all. Servers keep the whole shutdown (their logs and exit codes are tested).

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

import atexit
import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
from typing import Any, NoReturn

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
    # The sampler's compiled functions: loading numba's cache costs each server 0.3-0.6 s of CPU at
    # engine load (its `warm()` then finds them compiled). Compiling starts no thread, so forking
    # after it is as safe as after the imports.
    with contextlib.suppress(Exception):
        importlib.import_module("qwen_gateway.engines.local.kernels").warm()


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
                    # The worker is gone or done: nothing of the template's needs a teardown, and
                    # tearing down its torch heap takes seconds that the worker's exit would wait for.
                    os._exit(0)
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


def run_command() -> NoReturn:
    """A CLI command run to its end: its exit code as the interpreter sets it (``SystemExit``'s code;
    an exception's traceback printed and 1), then :func:`finish`."""
    try:
        runpy.run_module("qwen_gateway", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except KeyboardInterrupt:
        raise  # the interpreter's own handling (it ends the process by SIGINT)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    finish(code)


def exit_code(exc: SystemExit) -> int:
    """What the interpreter makes of ``exc``: None is 0, an int itself, anything else is printed to
    stderr and is 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    with contextlib.suppress(Exception):
        print(exc.code, file=sys.stderr)
    return 1


def finish(code: int) -> NoReturn:
    """The start of ``Py_FinalizeEx``: wait for non-daemon threads, run ``atexit`` handlers, flush the
    standard streams; then leave without tearing the heap down (see the module docstring)."""
    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _preload()
    child = serve(sys.argv[1])
    become(child)
    if "log" not in child:
        run_command()
    # A server. Left to propagate, as under ``python -m``: SystemExit sets the exit code, anything else
    # prints its traceback and exits 1, and the interpreter's shutdown (thread joins, atexit) runs.
    runpy.run_module("qwen_gateway", run_name="__main__", alter_sys=True)
