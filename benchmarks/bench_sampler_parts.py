"""Where the batched sampler's time goes inside the engine, at batch 8: a breakdown of
``bench_streams.py --parts sampling``'s one figure.

Eight seeded streams at the checkpoint's default sampling run through ``LocalEngine.generate`` (as in
``bench_streams.py``), and the sampler's parts are timed in the inference thread itself (CPU time of
that thread), only on steps of 8 rows: the penalties, the candidate search (block maxima, the top
blocks, their gathered ids, the top k among them), the draw from the candidates, and the whole call.
Timing them in a separate loop would mislead: right after the output layer's product has streamed
its weight (19 MB for tiny-qwen2.5) through the caches, each small tensor operation costs several
times what it costs in a warm loop, so only the figures measured between real steps count.

    python benchmarks/bench_sampler_parts.py [--model-path DIR] [--threads N] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from bench_streams import PROMPT, TINY, Probe, req, stream

from qwen_gateway.engines.local import LocalEngine, sampling
from qwen_gateway.settings import ModelConfig, Settings

kernels: Any
try:  # the sampler's compiled loops (absent before they landed)
    from qwen_gateway.engines.local import kernels
except ImportError:
    kernels = None

ROWS = 8


class Parts:
    """CPU nanoseconds of each timed part, collected only while a call of ``ROWS`` rows runs. Patches
    through ``bench_streams.Probe``'s ``wrap``/``undo``."""

    def __init__(self) -> None:
        self.times: dict[str, list[int]] = collections.defaultdict(list)
        self.active = False
        self._patches = Probe()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        if not hasattr(owner, name):  # a part this commit's sampler does not have
            return

        def hook(original: Callable[..., Any]) -> Callable[..., Any]:
            def inner(*a: Any, **k: Any) -> Any:
                if not self.active:
                    return original(*a, **k)
                t = time.thread_time_ns()
                try:
                    return original(*a, **k)
                finally:
                    self.times[label].append(time.thread_time_ns() - t)

            return inner

        self._patches.wrap(owner, name, hook)

    def wrap_call(self) -> None:
        def hook(original: Callable[..., Any]) -> Callable[..., Any]:
            def sample(self_: Any, rows: Any, logits: Any, *a: Any, **k: Any) -> Any:
                self.active = len(rows) == ROWS
                t = time.thread_time_ns()
                try:
                    return original(self_, rows, logits, *a, **k)
                finally:
                    if self.active:
                        self.times["whole call"].append(time.thread_time_ns() - t)
                    self.active = False

            return sample

        self._patches.wrap(sampling.BatchSampler, "sample", hook)

    def undo(self) -> None:
        self._patches.undo()


async def run(path: str, max_tokens: int) -> Parts:
    config = ModelConfig(id="bench", path=path, max_batch_size=16)
    engine = LocalEngine(config, settings=Settings(home=Path(tempfile.mkdtemp())))
    await engine.start()
    parts = Parts()
    try:
        await stream(engine, req(PROMPT, 8, 1, "warm"))
        parts.wrap(sampling._Penalties, "apply", "penalties")
        parts.wrap(sampling._Penalties, "_take_new_ids", "  of which: extend the index")
        if kernels is not None:
            parts.wrap(kernels, "repetition_penalty", "  of which: compiled penalty")
        parts.wrap(sampling, "_search", "candidate search")
        parts.wrap(sampling, "_gather_blocks", "  of which: gather the top blocks")  # (before the kernels)
        parts.wrap(sampling, "_split", "  of which: block maxima (torch amax)")
        if kernels is not None:  # (commits before the compiled loops have none)
            parts.wrap(kernels, "top_k_from_maxima", "  of which: compiled search in the top blocks")
            parts.wrap(kernels, "nucleus_draw", "  of which: compiled cut and draw")
        parts.wrap(sampling.BatchSampler, "_sample_candidates", "temperature, top-p, draw")
        parts.wrap(sampling.BatchSampler, "_draw", "  of which: the draw")
        parts.wrap(sampling._Found, "ids", "  of which: the drawn ids")
        parts.wrap_call()
        for round_ in range(2):
            await asyncio.gather(
                *(stream(engine, req(PROMPT, max_tokens, 7 + i, f"r{round_}s{i}")) for i in range(ROWS))
            )
    finally:
        parts.undo()
        await engine.aclose()
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None, help=f"checkpoint (default: {TINY})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model_path or str(TINY.resolve())
    parts = asyncio.run(run(path, args.max_tokens))
    whole = parts.times.get("whole call", [])
    if not whole:
        print(f"no sampler call ran at batch {ROWS}")
        return
    print(f"model: {path}, threads {torch.get_num_threads()}, sampler calls at batch {ROWS}: {len(whole)}")
    order = [
        "penalties",
        "  of which: extend the index",
        "  of which: compiled penalty",
        "candidate search",
        "  of which: block maxima (torch amax)",
        "  of which: gather the top blocks",
    ]
    order += ["  of which: compiled search in the top blocks", "temperature, top-p, draw"]
    order += ["  of which: compiled cut and draw", "  of which: the draw", "  of which: the drawn ids"]
    order += ["whole call"]
    for label in order:
        values = parts.times.get(label)
        if values:
            print(f"  {label:36s} median {statistics.median(values) / 1000:7.1f} us  (n={len(values)})")


if __name__ == "__main__":
    main()
