"""Tokens/s through the real server (HTTP + SSE) for 1 and 4 concurrent streams.

Starts ``qwen-gateway serve`` on a free loopback port (the embedded default model unless
``--model ID=PATH`` is given), creates a key, streams with ``stream_options.include_usage`` and divides the
completion tokens the server reports by wall time. Compare with ``bench_engine_direct.py``, which
calls the same engine in-process.

    python benchmarks/bench_server.py [--model qwen-plus=/path] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import start_server

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


async def one_stream(client: AsyncOpenAI, model: str, max_tokens: int, seed: int) -> int:
    stream = await client.chat.completions.create(
        model=model,
        messages=PROMPT,
        stream=True,
        max_tokens=max_tokens,  # type: ignore[arg-type]
        temperature=0.7,
        top_p=1.0,  # as bench_engine_direct: no nucleus sort over the vocabulary
        seed=seed,
        stream_options={"include_usage": True},
    )
    tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


async def measure(base_url: str, key: str, model: str, streams: int, max_tokens: int) -> float:
    client = AsyncOpenAI(api_key=key, base_url=base_url)
    start = time.perf_counter()
    counts = await asyncio.gather(*(one_stream(client, model, max_tokens, 100 + i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="ID=PATH; default: the embedded default model")
    parser.add_argument(
        "--home",
        type=Path,
        help="gateway home (default: a temp dir; ~/.qwen-gateway's "
        "embedded model is reused when --home is ~/.qwen-gateway)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="qwgw-bench-"))
    extra = ["--model", args.model] if args.model else []
    server = start_server(home, *extra, timeout=600)
    try:
        model = args.model.split("=", 1)[0] if args.model else "smollm2-135m-instruct"
        base = server.compat_url
        asyncio.run(measure(base, server.api_key, model, 1, 8))  # warm-up
        for streams in (1, 4):
            rates = [
                asyncio.run(measure(base, server.api_key, model, streams, args.max_tokens))
                for _ in range(args.rounds)
            ]
            print(
                f"server  {model}  streams={streams}  tokens/s={max(rates):.1f}  "
                f"(best of {args.rounds}, max_tokens={args.max_tokens})"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
