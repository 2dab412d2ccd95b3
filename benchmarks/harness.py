"""What the gateway benchmarks share: server processes pinned to a core and measured from /proc, API
keys made with the CLI, and a raw-socket HTTP/1.1 keep-alive load generator.

Used by bench_overhead.py, bench_metering.py and bench_upstream.py. The load generator is raw asyncio
sockets (one keep-alive connection per client, the request bytes built once) so that the client's
own cost stays small and off the server's core; a server's cost is read as user + system CPU time of
all its threads from ``/proc/<pid>/stat``, which moves far less with other load on a shared machine
than latencies or requests/s do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
KEY = re.compile(r"\bsk-[0-9a-zA-Z_-]{16,}")
Check = Callable[[int, bytes], None]  # sees each answer's (status, body); raises on a wrong one


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of process ``pid`` so far."""
    # Fields 14 and 15 (utime, stime) of /proc/<pid>/stat. The command name (field 2) is in
    # parentheses and may hold spaces: split after its closing one.
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGINT (a graceful shutdown), then SIGKILL after 30 s; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(core: int) -> Callable[[], None]:
    """A ``preexec_fn`` pinning the child to one core."""
    return lambda: os.sched_setaffinity(0, {core})


def gateway_env(*paths: Path) -> dict[str, str]:
    """The environment of a gateway subprocess: this checkout (and ``paths``) first on PYTHONPATH."""
    extra = [str(p) for p in (REPO, *paths)]
    old = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*extra, *([old] if old else [])]),
        "PYTHONUNBUFFERED": "1",
    }


def create_key(home: Path, name: str, *options: str, env: Mapping[str, str] | None = None) -> str:
    """``qwen-gateway keys create`` in ``home``; the new key."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_gateway",
            "keys",
            "create",
            "--name",
            name,
            *options,
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=dict(env) if env is not None else gateway_env(BENCH),
        timeout=120,
    ).stdout
    match = KEY.search(out)
    assert match, out
    return match.group(0)


def serve(
    config: Path, home: Path, core: int, *, log_level: str = "warning", env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """``qwen-gateway serve`` pinned to ``core``, healthy; (process, port). Its output goes to
    ``home/server.log``."""
    port = free_port()
    log = home / "server.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwen_gateway",
            "serve",
            "--config",
            str(config),
            "--home",
            str(home),
            "--port",
            str(port),
            "--log-level",
            log_level,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else gateway_env(BENCH),
        preexec_fn=pinned(core),
    )
    wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
    return proc, port


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{url} did not become healthy:\n{log.read_text()[-3000:]}")


def chat_request(port: int, path: str, key: str, model: str, *, stream: bool) -> bytes:
    """The bytes of one chat-completion POST ("Hello"), built once per run."""
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        body["stream"] = True
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
    """(status, body, perf_counter when the first body byte that is not a comment arrived)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    match = _LENGTH.search(lower)
    if match:
        body = await reader.readexactly(int(match.group(1)))
        return status, body, time.perf_counter()
    assert b"transfer-encoding: chunked" in lower, head
    parts: list[bytes] = []
    first = 0.0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, b"".join(parts), first
        chunk = (await reader.readexactly(size + 2))[:-2]
        if not first and chunk.strip() and not chunk.startswith(b":"):
            first = time.perf_counter()
        parts.append(chunk)


@dataclass
class Run:
    latencies: list[float]  # seconds, whole answers
    ttfb: list[float]  # seconds to the first body byte
    wall: float  # seconds for the whole run


async def drive(port: int, payload: bytes, clients: int, total: int, check: Check) -> Run:
    """``total`` requests of ``payload`` over ``clients`` keep-alive connections; ``check`` sees
    every (status, body) and raises on a wrong answer."""
    latencies: list[float] = []
    ttfb: list[float] = []
    remaining = total
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            writer.write(payload)
            status, body, first = await read_response(reader)
            end = time.perf_counter()
            check(status, body)
            latencies.append(end - start)
            ttfb.append(first - start)

    start = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in conns))
    wall = time.perf_counter() - start
    for _, writer in conns:
        writer.close()
    return Run(latencies, ttfb, wall)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def py_spy(
    pid: int, out: str, fmt: str = "flamegraph", extra: tuple[str, ...] = ()
) -> subprocess.Popen[bytes]:
    """py-spy sampling process ``pid`` until SIGINT (``fmt`` raw: collapsed stacks, for text)."""
    binary = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            *(str(binary), "record", "--pid", str(pid), "--output", out, "--format", fmt),
            *("--rate", "250", "--nonblocking", *extra),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
