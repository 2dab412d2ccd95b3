"""Tokens/s of LocalEngine called in-process (no HTTP), for 1 and 4 concurrent streams, per scheduler.

Loads the embedded default model (SmolLM2-135M-Instruct GGUF, fetched into ~/.qwen-gateway on first
use) unless ``--model-path`` is given, then for each scheduler (``batched``, ``interleaved``) runs
1 stream and N concurrent streams (temperature 0.7, seeded, max_tokens 64) straight against
``LocalEngine.generate`` and divides the completion tokens by wall time. One warm-up request runs first.
Compare with ``bench_server.py`` for the cost of the HTTP layer.

    python benchmarks/bench_engine_direct.py [--model-path DIR|FILE.gguf] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from qwen_gateway.engines.base import ChatMessage, Finished, GenerationRequest, SamplingParams
from qwen_gateway.engines.local import LocalEngine, ensure_embedded_model
from qwen_gateway.settings import ModelConfig, Settings

PROMPT = "Write a short story about a lighthouse keeper."


async def one_stream(engine: LocalEngine, max_tokens: int, seed: int) -> tuple[int, float]:
    """(completion tokens, seconds to the first event)."""
    request = GenerationRequest(
        request_id=f"bench-{seed}",
        model="bench",
        messages=(ChatMessage("user", PROMPT),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=seed),
    )
    started = time.perf_counter()
    first: float | None = None
    async for event in engine.generate(request):
        if first is None:
            first = time.perf_counter() - started
        if isinstance(event, Finished):
            return event.usage.completion_tokens, first
    raise RuntimeError("stream ended without Finished")


async def measure(engine: LocalEngine, streams: int, max_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, mean time to first token)."""
    start = time.perf_counter()
    results = await asyncio.gather(*(one_stream(engine, max_tokens, 100 + i) for i in range(streams)))
    elapsed = time.perf_counter() - start
    return sum(t for t, _ in results) / elapsed, statistics.mean(f for _, f in results)


async def bench(path: str, scheduler: str, streams: list[int], max_tokens: int, rounds: int) -> None:
    config = ModelConfig(id="bench", path=path, max_batch_size=max(8, *streams))
    engine = LocalEngine(config, settings=Settings(), scheduler=scheduler)  # type: ignore[arg-type]
    await engine.start()
    try:
        await one_stream(engine, 8, 1)  # warm-up: first-call allocations, lazy imports
        for n in streams:
            runs = [await measure(engine, n, max_tokens) for _ in range(rounds)]
            best = max(r[0] for r in runs)
            ttft = statistics.mean(r[1] for r in runs)
            print(
                f"{scheduler:<12} {n} stream{'s' if n > 1 else ' '}: {best:7.1f} tokens/s "
                f"(best of {rounds}; {best / n:6.1f} per stream; first token {ttft * 1000:5.0f} ms)",
                flush=True,
            )
    finally:
        await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", help="checkpoint dir or .gguf; default: the embedded SmolLM2 GGUF")
    parser.add_argument("--home", type=Path, default=Path("~/.qwen-gateway").expanduser())
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scheduler", choices=["batched", "interleaved", "both"], default="both")
    args = parser.parse_args()
    path = args.model_path or str(ensure_embedded_model(args.home))
    schedulers = ["batched", "interleaved"] if args.scheduler == "both" else [args.scheduler]
    print(f"model: {path}\nmax_tokens={args.max_tokens}, temperature=0.7, seeded\n", flush=True)
    for scheduler in schedulers:
        asyncio.run(bench(path, scheduler, args.streams, args.max_tokens, args.rounds))


if __name__ == "__main__":
    main()
