"""Soak: 10,000 mixed requests against a real server, watching its RSS, open FDs and threads for drift.

Starts ``qwen-gateway serve`` on a free loopback port with a tiny checkpoint (default
``../shared/models/tiny-qwen2.5``) and small answers, then sends a fixed mix, ``--concurrency`` at a time:
non-stream, stream (with usage), ``n=2``, errors (bad parameter, unknown model, bad key, bad JSON),
streams the client hangs up on after the first chunk and non-stream calls it abandons. Every
``--every`` requests it samples the server process (RSS, open file descriptors, threads) and at the end
prints each sample and the drift against the sample after the first ``--every`` requests (target: RSS
within 5 %, FDs and threads flat). It also checks the ledger has one row per request that reached the
engine.

    python benchmarks/soak.py [--requests 10000] [--every 1000] [--concurrency 8] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import MODELS, start_server

CONFIG = """
[[models]]
id = "qwen-plus"
path = "{path}"
max_output = {max_tokens}
"""

KINDS = ("plain", "stream", "plain", "stream", "n2", "error", "cancel_stream", "plain", "abandon", "stream")


def body(i: int, max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": f"soak request {i}"}],
        "max_tokens": max_tokens,
        **extra,
    }


async def one(client: httpx.AsyncClient, i: int, max_tokens: int, counts: dict[str, int]) -> None:
    kind = KINDS[i % len(KINDS)]
    url = "/compatible-mode/v1/chat/completions"
    if kind == "plain":
        r = await client.post(url, json=body(i, max_tokens))
        ok = r.status_code == 200
    elif kind == "n2":
        r = await client.post(url, json=body(i, max_tokens, n=2))
        ok = r.status_code == 200 and len(r.json()["choices"]) == 2
    elif kind == "stream":
        payload = body(i, max_tokens, stream=True, stream_options={"include_usage": True})
        async with client.stream("POST", url, json=payload) as r:
            lines = [line async for line in r.aiter_lines() if line]
        ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
    elif kind == "error":
        variant = (i // len(KINDS)) % 4
        if variant == 0:
            r = await client.post(url, json=body(i, max_tokens, temperature=5))
        elif variant == 1:
            r = await client.post(url, json={**body(i, max_tokens), "model": "no-such-model"})
        elif variant == 2:
            r = await client.post(url, json=body(i, max_tokens), headers={"Authorization": "Bearer sk-wrong"})
        else:
            r = await client.post(url, content=b'{"model": "qwen-plus", "temperature": NaN}')
        ok = r.status_code in (400, 401, 404)
    elif kind == "cancel_stream":
        payload = body(i, max_tokens, stream=True)
        async with client.stream("POST", url, json=payload) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # hang up after the first chunk
        ok = r.status_code == 200
    else:  # abandon: a non-stream call the client gives up on almost at once
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.post(url, json=body(i, max_tokens)), timeout=0.02)
        ok = True
    counts[kind + ("" if ok else ":failed")] = counts.get(kind + ("" if ok else ":failed"), 0) + 1


def sample(proc: psutil.Process) -> tuple[float, int, int]:
    return proc.memory_info().rss / 2**20, proc.num_fds(), proc.num_threads()


async def run(
    base_url: str, key: str, args: argparse.Namespace, proc: psutil.Process
) -> list[tuple[int, float, int, int, float]]:
    samples: list[tuple[int, float, int, int, float]] = []
    counts: dict[str, int] = {}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
    ) as client:
        next_i = 0
        start = time.monotonic()

        async def worker(stop: int) -> None:
            nonlocal next_i
            while next_i < stop:
                i = next_i
                next_i += 1
                await one(client, i, args.max_tokens, counts)

        for block_end in range(args.every, args.requests + 1, args.every):
            await asyncio.gather(*(worker(block_end) for _ in range(args.concurrency)))
            # Let abandoned and cancelled requests settle before sampling.
            await asyncio.sleep(1.0)
            rss, fds, threads = sample(proc)
            samples.append((block_end, rss, fds, threads, time.monotonic() - start))
            print(
                f"  {block_end:>6} requests  rss {rss:8.1f} MiB  fds {fds:4d}  threads {threads:3d}  "
                f"{time.monotonic() - start:7.1f} s",
                flush=True,
            )
            if time.monotonic() - start > args.max_seconds:
                print(f"stopping early: over --max-seconds {args.max_seconds}")
                break
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(MODELS / "tiny-qwen2.5"))
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--max-seconds", type=float, default=3600, help="stop after the block running past this"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        config = home / "config.toml"
        config.write_text(CONFIG.format(path=args.model_path, max_tokens=args.max_tokens))
        server = start_server(home, "--config", str(config), "--log-level", "warning")
        try:
            proc = psutil.Process(server.proc.pid)
            print(f"soak: {args.requests} requests, {args.concurrency} at a time, mix {'/'.join(KINDS)}")
            samples = asyncio.run(run(server.base_url, server.api_key, args, proc))
            rows = len(server.ledger())
        finally:
            server.stop()
    if not samples:
        return
    _, rss0, fds0, threads0, _ = samples[0]
    _, rss1, fds1, threads1, elapsed = samples[-1]
    done = samples[-1][0]
    print(f"ledger rows: {rows} (for {done} requests, of which errors and early refusals have none)")
    print(f"throughput: {done / elapsed:.1f} requests/s over {elapsed:.0f} s (shared machine)")
    print(
        f"drift after the first {args.every}:  rss {rss1 - rss0:+.1f} MiB ({(rss1 / rss0 - 1) * 100:+.2f} %, "
        f"target within 5 %)  fds {fds1 - fds0:+d}  threads {threads1 - threads0:+d}"
    )
    print(
        f"max over samples: rss {max(s[1] for s in samples):.1f} MiB  fds {max(s[2] for s in samples)}  "
        f"threads {max(s[3] for s in samples)}"
    )


if __name__ == "__main__":
    main()
