"""Aggregate decode throughput of a VL checkpoint at 1 and 4 concurrent image streams.

Each stream is one chat request with a 640x480 image and a short question, generating ``--max-tokens``
tokens with seeded sampling (set explicitly: the VL checkpoints' own generation_config is near-greedy).
Requests go straight through ``LocalEngine.generate`` (the batched scheduler), or with ``--server``
through the real HTTP server (openai SDK, streaming) as well. Prints wall-clock tokens/s and tokens per
CPU-second of the process (steadier on a shared machine), best of ``--rounds``.

    python benchmarks/bench_vl.py [--model-path P ...] [--streams 1 4] [--max-tokens 64] [--server]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from qwen_gateway.engines.base import (
    ChatMessage,
    Finished,
    GenerationRequest,
    ImagePart,
    SamplingParams,
    TextPart,
)
from qwen_gateway.engines.local import LocalEngine
from qwen_gateway.settings import ModelConfig, Settings

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
DEFAULT_MODELS = [MODELS / "tiny-qwen3-vl", MODELS / "tiny-qwen2.5-vl"]


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def request(i: int, max_tokens: int, image: bytes) -> GenerationRequest:
    content = (ImagePart(image, "image/png"), TextPart(f"Describe picture {i}."))
    return GenerationRequest(
        request_id=f"vl-{i}-{time.monotonic_ns()}",
        model="bench",
        messages=(ChatMessage("user", content),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=i),
    )


async def one(engine: LocalEngine, req: GenerationRequest) -> int:
    async for event in engine.generate(req):
        if isinstance(event, Finished):
            return event.usage.completion_tokens
    return 0


async def direct(path: Path, streams: list[int], max_tokens: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        engine = LocalEngine(ModelConfig(id="bench", path=str(path)), settings=Settings(home=Path(home)))
        await engine.start()
        images = [picture(i) for i in range(max(streams))]
        await one(engine, request(0, 4, images[0]))  # warm-up
        base = base_cpu = 0.0
        for n in streams:
            best = best_cpu = 0.0
            for _ in range(rounds):
                start, cpu = time.perf_counter(), time.process_time()
                counts = await asyncio.gather(
                    *(one(engine, request(i, max_tokens, images[i])) for i in range(n))
                )
                best = max(best, sum(counts) / (time.perf_counter() - start))
                best_cpu = max(best_cpu, sum(counts) / (time.process_time() - cpu))
            base, base_cpu = base or best, base_cpu or best_cpu
            print(
                f"  direct {n:2d} stream{'s' if n > 1 else ' '}: {best:7.1f} tokens/s wall ({best / base:4.2f}x one), "
                f"{best_cpu:7.1f} tokens per CPU-second ({best_cpu / base_cpu:4.2f}x); best of {rounds}",
                flush=True,
            )
        await engine.aclose()


def through_server(path: Path, streams: list[int], max_tokens: int, rounds: int) -> None:
    import base64
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from tests.support import start_server

    with tempfile.TemporaryDirectory() as tmp:
        srv = start_server(Path(tmp) / "home", "--model", f"qwen3-vl-plus={path}")
        try:
            url = "data:image/png;base64," + base64.b64encode(picture(0)).decode()

            def stream(i: int) -> int:
                client = OpenAI(api_key=srv.api_key, base_url=srv.compat_url)
                chunks = client.chat.completions.create(
                    model="qwen3-vl-plus",
                    messages=[
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": url}},
                                {"type": "text", "text": f"Describe picture {i}."},
                            ],
                        }
                    ],
                    stream=True,
                    stream_options={"include_usage": True},
                    max_tokens=max_tokens,
                    temperature=1.0,
                    top_p=1.0,
                    seed=i,
                    extra_body={"top_k": 0},
                )
                total = 0
                for chunk in chunks:
                    if chunk.usage is not None:
                        total = chunk.usage.completion_tokens
                return total

            stream(0)
            base = 0.0
            for n in streams:
                best = 0.0
                for _ in range(rounds):
                    start = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        counts = list(pool.map(stream, range(n)))
                    best = max(best, sum(counts) / (time.perf_counter() - start))
                base = base or best
                print(
                    f"  server {n:2d} stream{'s' if n > 1 else ' '}: {best:7.1f} tokens/s wall ({best / base:4.2f}x one)"
                )
        finally:
            srv.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, action="append")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", action="store_true")
    args = parser.parse_args()
    for path in args.model_path or DEFAULT_MODELS:
        print(f"{path.name}: {args.max_tokens} tokens per stream, a 640x480 image each", flush=True)
        asyncio.run(direct(path, args.streams, args.max_tokens, args.rounds))
        if args.server:
            through_server(path, args.streams, args.max_tokens, args.rounds)


if __name__ == "__main__":
    main()
