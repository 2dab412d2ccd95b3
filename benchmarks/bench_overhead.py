"""The gateway's own cost per request: the real server in front of an engine that costs nothing.

Starts ``qwen-gateway serve`` as a subprocess pinned to ONE core, serving ``qwen-plus`` from
``benchmarks/zero_cost_engine.py`` (20 one-token chunks, usage 7/20, instantly), with API keys on (a key
made with the CLI, sent on every request) and the usage ledger on (one row per request, as always).
The load generator runs in this process, pinned to ANOTHER core, over raw asyncio sockets with HTTP/1.1
keep-alive (one connection per client) so that the client's own cost stays small and off the server's
core. For 1 and 16 concurrent clients, non-streaming and streaming, it prints:

- latency p50/p99 of whole answers: the gateway's added latency, since the engine adds none;
- requests/s;
- CPU ms per request of the server process (user + system time of all its threads, from
  ``/proc/<pid>/stat``, over the measured requests only).

    python benchmarks/bench_overhead.py [--requests 2000] [--repeat 2] [--log-level info]
        [--server-core 0 --client-core 1] [--py-spy out.svg]

With ``--py-spy FILE`` the server is sampled by py-spy during the 16-client runs (``--py-spy-format
raw`` writes collapsed stacks for text analysis). The machine may be shared: CPU ms per request is the
figure to trust; latencies and requests/s move with whatever else runs on the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
MODEL = "qwen-plus"
CONFIG = f"""
[[models]]
id = "{MODEL}"
engine = "zero_cost_engine:ZeroCostEngine"
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHUNKS = 20  # zero_cost_engine.CHUNKS
SENT = 0  # requests sent, warm-ups included, to compare with the ledger at the end


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    home: Path

    def cpu_seconds(self) -> float:
        # Fields 14 and 15 (utime, stime) of /proc/<pid>/stat cover every thread of the process. The
        # command name (field 2) is in parentheses and may hold spaces: split after its closing one.
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, core: int, log_level: str) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
    }
    base = [sys.executable, "-m", "qwen_gateway"]
    created = subprocess.run(
        [*base, "keys", "create", "--name", "bench", "--home", str(home)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    ).stdout
    match = re.search(r"\bsk-[0-9a-f]{32}\b", created)
    assert match, created
    port = _free_port()
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            *base,
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
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{(home / 'server.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return Server(proc, port, match.group(0), home)
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy")


def _request(port: int, key: str, stream: bool) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        body["stream"] = True
    data = json.dumps(body).encode()
    head = (
        f"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    match = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    if match:
        return status, await reader.readexactly(int(match.group(1)))
    assert b"transfer-encoding: chunked" in lower, head
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return status, b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


def _check(status: int, body: bytes, stream: bool) -> None:
    if status != 200:
        raise SystemExit(f"server answered {status}: {body[:300]!r}")
    if stream:
        ok = body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") >= CHUNKS + 2
    else:
        ok = b'"completion_tokens":20' in body
    if not ok:
        raise SystemExit(f"unexpected answer: {body[:300]!r}")


async def drive(port: int, key: str, clients: int, total: int, stream: bool) -> tuple[list[float], float]:
    """``total`` requests over ``clients`` keep-alive connections; (latencies in s, wall seconds)."""
    payload = _request(port, key, stream)
    latencies: list[float] = []
    remaining = total
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal remaining
        global SENT
        while remaining > 0:
            remaining -= 1
            SENT += 1
            start = time.perf_counter()
            writer.write(payload)
            status, body = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            _check(status, body, stream)

    start = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in conns))
    wall = time.perf_counter() - start
    for _, writer in conns:
        writer.close()
    return latencies, wall


def _pct(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def run_case(server: Server, clients: int, total: int, stream: bool) -> str:
    asyncio.run(drive(server.port, server.key, clients, max(50, total // 10), stream))  # warm-up
    cpu0 = server.cpu_seconds()
    latencies, wall = asyncio.run(drive(server.port, server.key, clients, total, stream))
    cpu = server.cpu_seconds() - cpu0
    latencies.sort()
    return (
        f"{'stream' if stream else 'non-stream':10s}  clients={clients:<3d} n={total:<5d} "
        f"p50={_pct(latencies, 0.5) * 1e3:7.2f} ms  p99={_pct(latencies, 0.99) * 1e3:7.2f} ms  "
        f"rps={total / wall:7.1f}  cpu/req={cpu / total * 1e3:5.2f} ms"
    )


def _py_spy(pid: int, out: str, fmt: str, extra: list[str]) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--output",
            out,
            "--format",
            fmt,
            "--rate",
            "250",
            "--nonblocking",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per 16-client case")
    parser.add_argument("--single-requests", type=int, default=500, help="requests per 1-client case")
    parser.add_argument("--repeat", type=int, default=1, help="run every case this many times")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--server-core", type=int, default=cores[0])
    parser.add_argument("--client-core", type=int, default=cores[-1])
    parser.add_argument("--py-spy", metavar="FILE", help="sample the server during the 16-client cases")
    parser.add_argument("--py-spy-format", default="flamegraph", choices=["flamegraph", "raw", "speedscope"])
    parser.add_argument("--py-spy-args", default="", help="more py-spy flags, e.g. '--gil' or '--native'")
    parser.add_argument("--only", choices=["stream", "non-stream"], help="run only these cases")
    args = parser.parse_args()
    if args.server_core == args.client_core:
        print("warning: server and client share one core; figures include the client", file=sys.stderr)
    home = Path(tempfile.mkdtemp(prefix="qwgw-overhead-"))
    server = start_server(home, args.server_core, args.log_level)
    os.sched_setaffinity(0, {args.client_core})
    try:
        print(
            f"server pid {server.proc.pid} on core {args.server_core}, client on core {args.client_core}, "
            f"keys on, ledger on, log level {args.log_level}, load {os.getloadavg()[0]:.2f}"
        )
        streams = [False, True] if args.only is None else [args.only == "stream"]
        for _ in range(args.repeat):
            for stream in streams:
                for clients in (1, 16):
                    spy = None
                    if args.py_spy and clients == 16:
                        suffix = "stream" if stream else "nonstream"
                        spy = _py_spy(
                            server.proc.pid,
                            f"{args.py_spy}.{suffix}",
                            args.py_spy_format,
                            args.py_spy_args.split(),
                        )
                        time.sleep(1.0)  # py-spy attaches before the load starts
                    total = args.requests if clients > 1 else args.single_requests
                    print(run_case(server, clients, total, stream), flush=True)
                    if spy is not None:
                        spy.send_signal(signal.SIGINT)
                        spy.wait(timeout=60)
    finally:
        code = server.stop()
        print(f"server exit status {code}; log {home / 'server.log'}")
    # Every answered request must have left exactly one ledger row once the server has stopped.
    print(f"requests sent {SENT}, ledger rows {_ledger_rows(home)}")


def _ledger_rows(home: Path) -> int:
    import sqlite3

    with sqlite3.connect(home / "gateway.db") as db:
        return int(db.execute("SELECT count(*) FROM usage_ledger").fetchone()[0])


if __name__ == "__main__":
    main()
