"""Gateway overhead in front of an upstream: direct vs through qwen-gateway vs through LiteLLM's proxy.

One fast mock upstream on loopback (``tests/upstream_fakes.FaultyUpstream`` in its "ok" mode, a raw
asyncio HTTP/1.1 server: 20 one-token chunks and a usage chunk when streaming, a whole JSON answer
otherwise) in its own process. In the same run, alternating case by case, the load generator drives:

- direct: the mock itself;
- qwen-gateway: ``qwen-gateway serve`` with the ``openai`` engine pointed at the mock, one worker,
  keys on (a metered key with a balance and rpm/tpm limits, so limits and metering run), ledger on;
- litellm: LiteLLM's proxy (its own venv, ``--litellm``; a pinned release, 1.109.1 here), one worker,
  master key on, no database (so no spend tracking: it does less work than ours per request).

Each gateway is pinned to its own core (``--gateway-core``); load generator and mock share the other
(``--client-core``). At 1, 4, 16 and 64 concurrent keep-alive connections, streaming and not, it prints
p50/p99 of the whole answer (streams: also time to the first byte of the body), the added p50/p99 over
direct, requests/s and CPU ms per request of the gateway process (/proc utime+stime, all threads).
Then it measures qwen-gateway's RSS before and after 10,000 more requests.

    python benchmarks/bench_upstream.py --litellm /work/litellm-venv/bin/litellm [--requests 1000]

The machine may be shared with other work: CPU ms per request is the figure to trust; latencies and
requests/s move with whatever else runs on the cores. Run from the repository root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNKS = 20


@dataclass
class Target:
    name: str
    port: int
    path: str
    key: str
    model: str
    proc: subprocess.Popen[bytes] | None = None

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mb(self) -> float:
        assert self.proc is not None
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE / 2**20

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
            time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy:\n{log.read_text()[-3000:]}")


def pinned(core: int) -> object:
    return lambda: os.sched_setaffinity(0, {core})


def start_mock(core: int, home: Path) -> Target:
    port = free_port()
    code = (
        "import time; from tests.upstream_fakes import FaultyUpstream as F; "
        f"u = F(tokens={CHUNKS}); u.port = 0; u.start(); print(u.port, flush=True); time.sleep(10**6)"
    )
    log = home / "mock.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        preexec_fn=pinned(core),  # type: ignore[arg-type]
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Target("direct", port, "/v1/chat/completions", "none", "ok", proc)


def start_gateway(core: int, home: Path, upstream: int) -> Target:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    config = home / "config.toml"
    config.write_text(
        f"""
[[models]]
id = "qwen-plus"
engine = "openai"
base_url = "http://127.0.0.1:{upstream}/v1"
upstream_model = "ok"
max_concurrency = 256
max_queue = 1024
"""
    )
    base = [sys.executable, "-m", "qwen_gateway"]
    created = subprocess.run(
        [
            *base,
            "keys",
            "create",
            "--name",
            "bench",
            "--balance",
            "1000000",
            "--rpm",
            "10000000",
            "--tpm",
            "10000000000",
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=120,
    ).stdout
    match = re.search(r"\bsk-[0-9a-zA-Z_-]{16,}", created)
    assert match, created
    port = free_port()
    log = home / "gateway.log"
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
            "warning",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=pinned(core),  # type: ignore[arg-type]
    )
    wait_healthy(f"http://127.0.0.1:{port}/health", proc, log)
    return Target(
        "qwen-gateway", port, "/compatible-mode/v1/chat/completions", match.group(0), "qwen-plus", proc
    )


def start_litellm(binary: str, core: int, home: Path, upstream: int) -> Target:
    config = home / "litellm.yaml"
    config.write_text(
        f"""model_list:
  - model_name: qwen-plus
    litellm_params:
      model: openai/ok
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: none
general_settings:
  master_key: sk-bench-master
litellm_settings:
  drop_params: true
"""
    )
    port = free_port()
    log = home / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [binary, "--config", str(config), "--port", str(port), "--num_workers", "1"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=pinned(core),  # type: ignore[arg-type]
    )
    wait_healthy(f"http://127.0.0.1:{port}/health/liveliness", proc, log)
    return Target("litellm", port, "/v1/chat/completions", "sk-bench-master", "qwen-plus", proc)


def payload(t: Target, stream: bool) -> bytes:
    body: dict[str, object] = {"model": t.model, "messages": [{"role": "user", "content": "Hello"}]}
    if stream:
        body["stream"] = True
    data = json.dumps(body).encode()
    return (
        f"POST {t.path} HTTP/1.1\r\nHost: 127.0.0.1:{t.port}\r\nAuthorization: Bearer {t.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, float]:
    """(status, body, perf_counter when the first body byte arrived)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    match = re.search(rb"\r\ncontent-length: *(\d+)", lower)
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


def check(t: Target, status: int, body: bytes, stream: bool) -> None:
    if status != 200:
        raise SystemExit(f"{t.name} answered {status}: {body[:300]!r}")
    ok = body.rstrip().endswith(b"data: [DONE]") if stream else b"tok19" in body
    if not ok:
        raise SystemExit(f"{t.name}: unexpected answer: {body[:300]!r}")


async def drive(t: Target, clients: int, total: int, stream: bool) -> tuple[list[float], list[float], float]:
    data = payload(t, stream)
    whole: list[float] = []
    ttfb: list[float] = []
    remaining = total
    conns = [await asyncio.open_connection("127.0.0.1", t.port) for _ in range(clients)]

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            writer.write(data)
            status, body, first = await read_response(reader)
            end = time.perf_counter()
            check(t, status, body, stream)
            whole.append(end - start)
            ttfb.append(first - start)

    start = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in conns))
    wall = time.perf_counter() - start
    for _, writer in conns:
        writer.close()
    return whole, ttfb, wall


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


@dataclass
class Result:
    p50: float
    p99: float
    ttfb50: float
    ttfb99: float
    rps: float
    cpu_ms: float


def run_case(t: Target, clients: int, total: int, stream: bool) -> Result:
    asyncio.run(drive(t, clients, max(clients * 4, total // 10), stream))  # warm-up
    cpu0 = t.cpu_seconds()
    whole, ttfb, wall = asyncio.run(drive(t, clients, total, stream))
    cpu = t.cpu_seconds() - cpu0
    return Result(
        pct(whole, 0.5) * 1e3,
        pct(whole, 0.99) * 1e3,
        pct(ttfb, 0.5) * 1e3,
        pct(ttfb, 0.99) * 1e3,
        total / wall,
        cpu / total * 1e3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--litellm", help="path of the litellm proxy executable (its own venv)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per case at c>=4")
    parser.add_argument("--single-requests", type=int, default=300, help="requests per case at c=1")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    cores = sorted(os.sched_getaffinity(0))
    parser.add_argument("--gateway-core", type=int, default=cores[0])
    parser.add_argument("--client-core", type=int, default=cores[-1])
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="qwgw-upstream-bench-"))
    mock = start_mock(args.client_core, home)
    targets = [mock, start_gateway(args.gateway_core, home, mock.port)]
    if args.litellm:
        targets.append(start_litellm(args.litellm, args.gateway_core, home, mock.port))
    os.sched_setaffinity(0, {args.client_core})
    try:
        print(
            f"gateways on core {args.gateway_core}; load generator and mock upstream on core "
            f"{args.client_core}; load average {os.getloadavg()[0]:.2f}; {CHUNKS} chunks per stream"
        )
        header = (
            f"{'mode':10s} {'c':>3s} {'target':13s} {'p50 ms':>8s} {'p99 ms':>8s} {'ttfb50':>8s} "
            f"{'ttfb99':>8s} {'+p50':>7s} {'+p99':>7s} {'+ttfb50':>8s} {'rps':>8s} {'cpu ms/req':>10s}"
        )
        print(header)
        for stream in (False, True):
            for clients in (int(c) for c in args.concurrency.split(",")):
                total = args.single_requests if clients == 1 else args.requests
                results = {t.name: run_case(t, clients, total, stream) for t in targets}  # alternating
                base = results["direct"]
                for name, r in results.items():
                    added = (
                        ""
                        if name == "direct"
                        else f"{r.p50 - base.p50:7.2f} {r.p99 - base.p99:7.2f} {r.ttfb50 - base.ttfb50:8.2f}"
                    )
                    cpu = "" if name == "direct" else f"{r.cpu_ms:10.2f}"
                    print(
                        f"{'stream' if stream else 'non-stream':10s} {clients:3d} {name:13s} {r.p50:8.2f} "
                        f"{r.p99:8.2f} {r.ttfb50:8.2f} {r.ttfb99:8.2f} {added:>24s} {r.rps:8.1f} {cpu}",
                        flush=True,
                    )
        ours = targets[1]
        before = ours.rss_mb()
        asyncio.run(drive(ours, 16, args.memory_requests, False))
        after = ours.rss_mb()
        print(
            f"qwen-gateway RSS: {before:.1f} MB before, {after:.1f} MB after {args.memory_requests} more "
            f"requests ({(after - before) / before * 100:+.1f} %)"
        )
    finally:
        for t in targets:
            t.stop()
        print(f"logs in {home}")


if __name__ == "__main__":
    main()
