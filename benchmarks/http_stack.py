"""What the edge limits cost: requests/s and server CPU per request of a trivial route, per HTTP protocol.

Runs uvicorn in a subprocess with a one-route FastAPI app, once per protocol:

- ``httptools``: uvicorn's stock fast path (what the gateway ran before the edge limits);
- ``guarded``: the gateway's protocol (``qwen_gateway.edge``: httptools + header caps + deadlines);
- ``h11``: uvicorn's pure-Python protocol (has a header-size cap, no count cap or deadlines).

A client process drives it over loopback with keep-alive connections (raw sockets, so the client costs
little). Prints requests/s (wall clock; noisy on a shared machine) and the server's CPU microseconds per
request (user+sys of the server process, the steadier figure).

    python benchmarks/http_stack.py [--requests 20000] [--connections 8] [--protocols httptools,guarded,h11]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time

import psutil

SERVER = r"""
import sys
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

app = FastAPI(openapi_url=None)

@app.get("/ping")
async def ping() -> Response:
    return Response(b'{"ok":true}', media_type="application/json")

name, port = sys.argv[1], int(sys.argv[2])
if name == "guarded":
    from qwen_gateway.edge import EdgeLimits, protocol_class
    http = protocol_class(EdgeLimits(max_header_bytes=65536, max_headers=100, header_timeout=10.0,
                                     body_idle_timeout=30.0, max_connections=1000))
else:
    http = name
uvicorn.run(app, host="127.0.0.1", port=port, http=http, log_level="warning", access_log=False)
"""

REQUEST = b"GET /ping HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_connection(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
    finally:
        writer.close()


async def drive(port: int, requests: int, connections: int) -> float:
    per = requests // connections
    start = time.perf_counter()
    await asyncio.gather(*(one_connection(port, per) for _ in range(connections)))
    return time.perf_counter() - start


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def measure(name: str, requests: int, connections: int) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, name, str(port)], env=os.environ.copy())
    try:
        wait_ready(port, proc)
        asyncio.run(drive(port, 2000, connections))  # warm-up
        server = psutil.Process(proc.pid)
        before = server.cpu_times()
        elapsed = asyncio.run(drive(port, requests, connections))
        after = server.cpu_times()
        cpu = (after.user - before.user) + (after.system - before.system)
        done = (requests // connections) * connections
        return done / elapsed, cpu / done * 1e6
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--protocols", default="httptools,guarded,h11")
    parser.add_argument("--rounds", type=int, default=3, help="alternate the protocols this many times")
    args = parser.parse_args()
    names = args.protocols.split(",")
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(measure(name, args.requests, args.connections))
    print(
        f"{args.requests} GET /ping per round, {args.connections} keep-alive connections, {args.rounds} rounds"
    )
    print(f"{'protocol':<10} {'req/s (best)':>13} {'req/s (median)':>15} {'server CPU us/req (median)':>27}")
    for name in names:
        rps = sorted(r for r, _ in results[name])
        cpu = sorted(c for _, c in results[name])
        print(f"{name:<10} {rps[-1]:>13.0f} {rps[len(rps) // 2]:>15.0f} {cpu[len(cpu) // 2]:>27.1f}")


if __name__ == "__main__":
    main()
