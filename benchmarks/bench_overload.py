"""Admission under overload: many more concurrent clients than the engine runs plus its queue.

Starts the real server on tiny-qwen2.5 with ``max_batch_size`` 8 and ``max_queue`` 16, sends 24
non-stream requests (what the engine runs plus its queue), and once the queue is full 40 more at once, and while they run samples ``/health``. Prints how fast surplus
requests were refused (503), how fast /health answered, whether every admitted request completed, and
whether the ledger holds exactly one row per admitted request (none for refused ones).

    python benchmarks/bench_overload.py [--clients 64] [--batch 8] [--queue 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
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


async def run(
    base: str, key: str, clients: int, max_tokens: int, fill: int
) -> tuple[list[tuple[int, float, str]], list[float], list[float]]:
    body = {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,  # long enough to still be running when the surplus arrives
        "temperature": 1.0,
        "seed": 3,
    }
    results: list[tuple[int, float, str]] = []
    health_ms: list[float] = []
    single_ms: list[float] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def one() -> None:
            start = time.perf_counter()
            r = await client.post(
                "/compatible-mode/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            results.append((r.status_code, (time.perf_counter() - start) * 1000, r.headers["x-request-id"]))

        async def probe() -> None:
            while not done.is_set():
                start = time.perf_counter()
                await client.get("/health")
                health_ms.append((time.perf_counter() - start) * 1000)
                await asyncio.sleep(0.05)

        prober = asyncio.create_task(probe())
        # First fill the engine and its queue, then send the surplus: each surplus request then meets
        # a full server, which is what the refusal latency is about (not the client's connect burst).
        capacity = [asyncio.create_task(one()) for _ in range(fill)]
        while True:
            model = (await client.get("/health")).json()["models"][0]
            if model["queued"] >= model["queue_limit"] or all(t.done() for t in capacity):
                break
            await asyncio.sleep(0.02)
        await asyncio.gather(*(one() for _ in range(clients - fill)))
        # Then one surplus request at a time (no burst on either side): the refusal itself.
        for _ in range(20):
            if all(t.done() for t in capacity):
                break
            start = time.perf_counter()
            r = await client.post(
                "/compatible-mode/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            if r.status_code == 503:
                single_ms.append((time.perf_counter() - start) * 1000)
        await asyncio.gather(*capacity)
        done.set()
        await prober
    return results, health_ms, single_ms


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
            results, health_ms, single_ms = asyncio.run(
                run(server.base_url, server.api_key, args.clients, args.max_tokens, args.batch + args.queue)
            )
            refused = [ms for status, ms, _ in results if status == 503]
            ok = [(ms, rid) for status, ms, rid in results if status == 200]
            other = [status for status, _, _ in results if status not in (200, 503)]
            rows = {rid: len(server.ledger(rid)) for _, _, rid in results}
            admitted_rows = sum(rows[rid] for _, rid in ok)
            refused_rows = sum(rows[rid] for status, _, rid in results if status == 503)
        finally:
            server.stop()
    print(f"clients {args.clients}, batch {args.batch}, queue {args.queue}, max_tokens {args.max_tokens}")
    print(f"admitted and completed: {len(ok)} (expected {args.batch + args.queue}); other statuses: {other}")
    if refused:
        print(
            f"refused 503: {len(refused)}  latency ms p50 {statistics.median(refused):.1f} "
            f"p99 {pct(refused, 0.99):.1f} max {max(refused):.1f}"
        )
    if single_ms:
        print(
            f"refused one at a time while full: {len(single_ms)}  latency ms p50 {statistics.median(single_ms):.1f} "
            f"max {max(single_ms):.1f}"
        )
    if ok:
        print(
            f"admitted latency ms p50 {statistics.median([m for m, _ in ok]):.0f} max {max(m for m, _ in ok):.0f}"
        )
    print(
        f"/health during overload: {len(health_ms)} probes, ms p50 {statistics.median(health_ms):.1f} "
        f"p99 {pct(health_ms, 0.99):.1f} max {max(health_ms):.1f}"
    )
    print(f"ledger rows: {admitted_rows} for {len(ok)} admitted requests, {refused_rows} for refused ones")


if __name__ == "__main__":
    main()
