"""Tokens/s of LocalEngine with and without a JSON-schema constraint, at 1 and 4 concurrent streams.

Runs in-process against ``LocalEngine.generate`` (no HTTP) on a tiny Qwen checkpoint by default (the
real 151k-token vocabulary, so the mask work is full size while the model itself is nearly free: the
worst case for the constraint's relative cost). Every request generates exactly ``--max-tokens``
tokens: the unconstrained ones because random weights practically never emit EOS, the constrained ones
because the schema (64 array items) is longer than that, so each is cut with "length".

Prints, per case, the median over ``--rounds`` of aggregate tokens/s (wall) and of process CPU
milliseconds per token (every thread: the machine is shared, and CPU time is less disturbed by the
other tenants than wall time), and the constraint's cost relative to the unconstrained run.

    python benchmarks/bench_constraints.py [--model-path DIR] [--max-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from qwen_gateway.engines.base import (
    ChatMessage,
    Finished,
    GenerationRequest,
    JsonConstraint,
    OutputConstraint,
    SamplingParams,
)
from qwen_gateway.engines.local import LocalEngine
from qwen_gateway.settings import ModelConfig, Settings

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "tiny-qwen2.5"
PROMPT = "List sixty-four short words as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "words": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 64,
            "maxItems": 64,
        },
        "count": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["words", "count"],
    "additionalProperties": False,
}


async def one_stream(
    engine: LocalEngine, max_tokens: int, seed: int, constraint: OutputConstraint | None
) -> int:
    request = GenerationRequest(
        request_id=f"bench-{seed}",
        model="bench",
        messages=(ChatMessage("user", PROMPT),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed),
        constraint=constraint,
    )
    async for event in engine.generate(request):
        if isinstance(event, Finished):
            return event.usage.completion_tokens
    raise RuntimeError("stream ended without Finished")


async def measure(
    engine: LocalEngine, streams: int, max_tokens: int, constraint: OutputConstraint | None
) -> tuple[float, float]:
    """(aggregate tokens/s by wall time, process CPU ms per token)."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = await asyncio.gather(
        *(one_stream(engine, max_tokens, 100 + i, constraint) for i in range(streams))
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = sum(tokens)
    return total / wall, 1000 * cpu / total


async def bench(path: str, max_tokens: int, rounds: int) -> None:
    engine = LocalEngine(ModelConfig(id="bench", path=path, max_batch_size=8), settings=Settings())
    await engine.start()
    constrained = JsonConstraint(SCHEMA)
    try:
        # Warm-up: first-call allocations, and the grammar's tokenizer setup and compile (cached after).
        await one_stream(engine, 8, 1, None)
        await one_stream(engine, 8, 1, constrained)
        print(f"model {path}, max_tokens {max_tokens}, median of {rounds} rounds (machine shared)")
        for streams in (1, 4):
            results: dict[str, list[tuple[float, float]]] = {"free": [], "json_schema": []}
            for _ in range(rounds):  # alternate, so drifting load hits both alike
                results["free"].append(await measure(engine, streams, max_tokens, None))
                results["json_schema"].append(await measure(engine, streams, max_tokens, constrained))
            medians = {
                k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
                for k, v in results.items()
            }
            for name, (tps, cpu) in medians.items():
                print(f"  {streams} stream(s) {name:12s} {tps:8.1f} tok/s  {cpu:7.3f} CPU ms/token")
            free, cons = medians["free"], medians["json_schema"]
            print(
                f"  {streams} stream(s) constraint cost: {100 * (1 - cons[0] / free[0]):5.1f} % of tokens/s, "
                f"{100 * (cons[1] / free[1] - 1):5.1f} % more CPU per token"
            )
    finally:
        await engine.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=str(MODEL))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(bench(args.model_path, args.max_tokens, args.rounds))


if __name__ == "__main__":
    main()
