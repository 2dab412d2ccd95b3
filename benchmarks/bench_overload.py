"""Admission under overload: many more concurrent clients than the engine runs plus its queue.

Starts the real server on tiny-qwen2.5 with ``max_batch_size`` 8 and ``max_queue`` 16, sends 24
non-stream requests (what the engine runs plus its queue), and once the queue is full sends the
surplus (40 more) at once, twice: from raw sockets, then from httpx; then one surplus request at a
time. Meanwhile it samples ``/health``. Prints how fast surplus requests were refused (503), how fast
/health answered, whether every admitted request completed, and whether the ledger holds exactly one
row per admitted request (none for refused ones).

Why two bursts: the load generator shares the 2-core machine with the server, and an httpx request
costs its client 1.3-2.4 ms of CPU against the server's ~0.2-0.25 ms to refuse it, so the httpx burst's
latency is mostly the client's own queue (its 40th request is written after its first 39). The raw
burst (a fresh connection per request, the request bytes built beforehand) is what the server costs a
surplus client. Both include the machine's run queue; the load-robust figure is the server's event-loop
thread's CPU per refusal over the raw burst (from /proc's schedstat, Linux), printed with its run-queue
wait (time it was runnable but another thread or process had the CPU).

    python benchmarks/bench_overload.py [--clients 64] [--batch 8] [--queue 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import MODELS, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_batch_size = {batch}
max_queue = {queue}
max_output = 4096
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def loop_thread_ms(pid: int) -> tuple[float, float] | None:
    """The server's main (event-loop) thread's CPU and run-queue wait so far, in ms (Linux)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as fh:
            run_ns, wait_ns, _ = fh.read().split()
    except OSError:
        return None
    return int(run_ns) / 1e6, int(wait_ns) / 1e6


async def raw_post(host: str, port: int, request: bytes) -> tuple[int, str]:
    """One request on a fresh connection, as a new client would send it: (status, request id)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        await reader.readexactly(int(headers.get("content-length", "0")))
        return int(lines[0].split()[1]), headers.get("x-request-id", "")
    finally:
        writer.close()


class Burst:
    """One surplus burst: each request's (client, status, ms, request id), and the server loop thread's
    CPU and run-queue ms over it."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.results: list[tuple[int, float, str]] = []
        self.loop_cpu_ms = float("nan")
        self.loop_wait_ms = float("nan")


async def run(
    base: str, key: str, clients: int, max_tokens: int, fill: int, pid: int
) -> tuple[list[tuple[int, float, str]], list[Burst], list[float], list[float]]:
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,  # long enough to still be running when the surplus arrives
        "temperature": 1.0,
        "seed": 3,
    }
    path = "/compatible-mode/v1/chat/completions"
    payload = json.dumps(body).encode()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    raw_request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    ).encode() + payload
    results: list[tuple[int, float, str]] = []
    bursts: list[Burst] = []
    health_ms: list[float] = []
    single_ms: list[float] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one(into: list[tuple[int, float, str]]) -> None:
            start = time.perf_counter()
            r = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
            into.append((r.status_code, (time.perf_counter() - start) * 1000, r.headers["x-request-id"]))

        async def one_raw(into: list[tuple[int, float, str]]) -> None:
            start = time.perf_counter()
            status, request_id = await raw_post(host, int(port), raw_request)
            into.append((status, (time.perf_counter() - start) * 1000, request_id))

        async def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await client.get("/health")
                health_ms.append((time.perf_counter() - start) * 1000)
                await asyncio.sleep(0.05)

        async def full() -> bool:
            model = (await client.get("/health")).json()["models"][0]
            return bool(model["queued"] >= model["queue_limit"])

        prober = asyncio.create_task(probe())
        # First fill the engine and its queue, then send the surplus: each surplus request then meets
        # a full server, which is what the refusal latency is about (not the client's connect burst).
        capacity = [asyncio.create_task(one(results)) for _ in range(fill)]
        while not await full() and not all(t.done() for t in capacity):
            await asyncio.sleep(0.02)
        for name, send in (("raw sockets", one_raw), ("httpx", one)):
            if all(t.done() for t in capacity):
                break
            burst = Burst(name)
            before = loop_thread_ms(pid)
            await asyncio.gather(*(send(burst.results) for _ in range(clients - fill)))
            after = loop_thread_ms(pid)
            if before is not None and after is not None:
                burst.loop_cpu_ms, burst.loop_wait_ms = after[0] - before[0], after[1] - before[1]
            bursts.append(burst)
        # Then one surplus request at a time (no burst on either side): the refusal itself.
        for _ in range(20):
            if all(t.done() for t in capacity):
                break
            start = time.perf_counter()
            r = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
            # Admitted (a slot freed meanwhile) or not, its ledger row is counted.
            results.append((r.status_code, float("nan"), r.headers["x-request-id"]))
            if r.status_code == 503:
                single_ms.append((time.perf_counter() - start) * 1000)
        await asyncio.gather(*capacity)
        done.set()
        await prober
    return results, bursts, health_ms, single_ms


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        config = home / "config.toml"
        config.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5", batch=args.batch, queue=args.queue))
        server = start_server(home, "--config", str(config), "--log-level", "warning")
        try:
            results, bursts, health_ms, single_ms = asyncio.run(
                run(
                    server.base_url,
                    server.api_key,
                    args.clients,
                    args.max_tokens,
                    args.batch + args.queue,
                    server.proc.pid,
                )
            )
            everything = results + [r for burst in bursts for r in burst.results]
            ok = [rid for status, _, rid in everything if status == 200]
            other = [status for status, _, _ in everything if status not in (200, 503)]
            rows = {rid: len(server.ledger(rid)) for _, _, rid in everything}
            admitted_rows = sum(rows[rid] for rid in ok)
            refused_rows = sum(rows[rid] for status, _, rid in everything if status == 503)
        finally:
            server.stop()
    print(f"clients {args.clients}, batch {args.batch}, queue {args.queue}, max_tokens {args.max_tokens}")
    print(
        f"admitted and completed: {len(ok)} (expected {args.batch + args.queue}, more if a slot freed "
        f"during the surplus); other statuses: {other}"
    )
    for burst in bursts:
        refused = [ms for status, ms, _ in burst.results if status == 503]
        admitted = sum(1 for status, _, _ in burst.results if status == 200)
        if refused:
            print(
                f"burst from {burst.client}: refused 503 {len(refused)} (admitted {admitted}), latency ms "
                f"p50 {statistics.median(refused):.1f} p99 {pct(refused, 0.99):.1f} max {max(refused):.1f}; "
                f"server loop thread CPU {burst.loop_cpu_ms:.1f} ms "
                f"({burst.loop_cpu_ms / len(burst.results):.2f} per request), run-queue wait {burst.loop_wait_ms:.1f} ms"
            )
    if single_ms:
        print(
            f"refused one at a time while full: {len(single_ms)}  latency ms p50 {statistics.median(single_ms):.1f} "
            f"max {max(single_ms):.1f}"
        )
    admitted_ms = [ms for status, ms, _ in results if status == 200 and ms == ms]
    if admitted_ms:
        print(f"admitted latency ms p50 {statistics.median(admitted_ms):.0f} max {max(admitted_ms):.0f}")
    print(
        f"/health during overload: {len(health_ms)} probes, ms p50 {statistics.median(health_ms):.1f} "
        f"p99 {pct(health_ms, 0.99):.1f} max {max(health_ms):.1f}"
    )
    print(f"ledger rows: {admitted_rows} for {len(ok)} admitted requests, {refused_rows} for refused ones")


if __name__ == "__main__":
    main()
