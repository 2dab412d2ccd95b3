"""The gateway's own cost per request: the real server in front of an engine that costs nothing.

Starts ``qwen-gateway serve`` as a subprocess pinned to ONE core, serving ``qwen-plus`` from
``benchmarks/zero_cost_engine.py`` (20 one-token chunks, usage 7/20, instantly), with API keys on (a key
made with the CLI, sent on every request) and the usage ledger on (one row per request, as always).
The load generator runs in this process, pinned to ANOTHER core, over raw asyncio sockets with HTTP/1.1
keep-alive (one connection per client; ``harness.py``, shared with the other gateway benchmarks) so
that the client's own cost stays small and off the server's core. For 1 and 16 concurrent clients, non-streaming and streaming, it prints:

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
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import BENCH, REPO, pct

__all__ = ["BENCH", "REPO", "Server", "_pct", "drive", "start_server"]  # bench_metering's imports

MODEL = "qwen-plus"
CONFIG = f"""
[[models]]
id = "{MODEL}"
engine = "zero_cost_engine:ZeroCostEngine"
"""
CHUNKS = 20  # zero_cost_engine.CHUNKS
SENT = 0  # requests sent, warm-ups included, to compare with the ledger at the end
_pct = pct  # the name bench_metering.py imports


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    key: str
    home: Path

    def cpu_seconds(self) -> float:
        return harness.cpu_seconds(self.proc.pid)

    def stop(self) -> int:
        return harness.stop(self.proc)


def start_server(home: Path, core: int, log_level: str) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    config.write_text(CONFIG)
    key = harness.create_key(home, "bench")
    proc, port = harness.serve(config, home, core, log_level=log_level)
    return Server(proc, port, key, home)


def _check(stream: bool) -> Callable[[int, bytes], None]:
    def check(status: int, body: bytes) -> None:
        if status != 200:
            raise SystemExit(f"server answered {status}: {body[:300]!r}")
        if stream:
            ok = body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") >= CHUNKS + 2
        else:
            ok = b'"completion_tokens":20' in body
        if not ok:
            raise SystemExit(f"unexpected answer: {body[:300]!r}")

    return check


async def drive(port: int, key: str, clients: int, total: int, stream: bool) -> tuple[list[float], float]:
    """``total`` requests over ``clients`` keep-alive connections; (latencies in s, wall seconds)."""
    global SENT
    SENT += total
    payload = harness.chat_request(port, "/compatible-mode/v1/chat/completions", key, MODEL, stream=stream)
    run = await harness.drive(port, payload, clients, total, _check(stream))
    return run.latencies, run.wall


def run_case(server: Server, clients: int, total: int, stream: bool) -> str:
    asyncio.run(drive(server.port, server.key, clients, max(50, total // 10), stream))  # warm-up
    cpu0 = server.cpu_seconds()
    latencies, wall = asyncio.run(drive(server.port, server.key, clients, total, stream))
    cpu = server.cpu_seconds() - cpu0
    return (
        f"{'stream' if stream else 'non-stream':10s}  clients={clients:<3d} n={total:<5d} "
        f"p50={pct(latencies, 0.5) * 1e3:7.2f} ms  p99={pct(latencies, 0.99) * 1e3:7.2f} ms  "
        f"rps={total / wall:7.1f}  cpu/req={cpu / total * 1e3:5.2f} ms"
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
                        spy = harness.py_spy(
                            server.proc.pid,
                            f"{args.py_spy}.{suffix}",
                            args.py_spy_format,
                            tuple(args.py_spy_args.split()),
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
