"""How the local engine scales with concurrent streams: throughput, sampling share, KV memory, stalls.

For each model (default: tiny-qwen2.5 and the embedded SmolLM2 GGUF) it prints

1. tokens/s at 1, 4, 8 and 16 concurrent streams at the checkpoint's default sampling (only
   ``max_tokens`` and a seed set), straight through ``LocalEngine.generate``; with ``--server`` also
   through the real HTTP server (streaming, ``stream_options.include_usage``);
2. the inference thread's CPU time spent choosing tokens per decode step as a share of the step's CPU
   time, at batch 8;
3. peak KV-cache bytes while 8 streams of mixed prompt lengths run, against the bytes the tokens the
   streams hold need (sum of their lengths × bytes per token) at that moment;
4. the longest gap between two deltas of a running stream while a ~32k-token prompt (or the model's
   context minus a margin) arrives and is prefilled, against the wall and CPU time of the step that
   carried a prefill chunk inside that gap (and, for comparison with older figures, against the
   median CPU time of every step in the window, decode steps included), with how many steps and
   chunks ran inside the gap and how long no step ran.

Internals are measured by wrapping engine methods from the outside, so the script runs unchanged on
older commits of the engine (it looks for the names each version has). CPU times come from
``time.thread_time`` on the inference thread, which holds up better than wall time on a shared machine.
``--threads 1`` runs torch on one intra-op thread: on a machine other jobs keep busy, a second thread
spends its share spinning at barriers waiting for a descheduled peer, and that spinning lands in the
CPU times; with one thread they count work only.

    python benchmarks/bench_streams.py [--model-path P ...] [--streams 1 4 8 16] [--max-tokens 64]
        [--parts throughput sampling kv gap] [--threads N] [--server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import itertools

from qwen_gateway.engines.base import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta
from qwen_gateway.engines.local import LocalEngine, ensure_embedded_model
from qwen_gateway.settings import ModelConfig, Settings

TINY = Path("/work/shared/models/tiny-qwen2.5")
PROMPT = "Write a short story about a lighthouse keeper."


def req(text: str, max_tokens: int, seed: int, rid: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        model="bench",
        messages=(ChatMessage("user", text),),
        sampling=SamplingParams(max_tokens=max_tokens, seed=seed),
    )


async def stream(engine: LocalEngine, r: GenerationRequest, stamps: list[float] | None = None) -> int:
    async for event in engine.generate(r):
        if stamps is not None and isinstance(event, TextDelta):
            stamps.append(time.perf_counter())
        if isinstance(event, Finished):
            return event.usage.completion_tokens
    raise RuntimeError("stream ended without Finished")


# -- instrumentation (outside-in, works on old and new engine layouts) ---------------------------------


class Probe:
    """Per-step CPU time of the inference thread, and of token choice inside it."""

    def __init__(self) -> None:
        self.step_cpu: list[float] = []
        self.step_rows: list[int] = []
        self.sample_cpu = 0.0
        self.samples: list[float] = []
        # Every step: (wall start, wall end, CPU time, decoding rows, prompt tokens of its chunks).
        self.steps: list[tuple[float, float, float, int, int]] = []
        self.on_step: Callable[[], None] | None = None
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, hook: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        original = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
        setattr(owner, name, hook(original))
        self._undo.append(lambda: setattr(owner, name, original))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()

    def install(self, engine: LocalEngine) -> None:
        from qwen_gateway.engines.local import sampling, sequence

        probe = self
        backend_cls = type(engine._scheduler._backend)  # type: ignore[union-attr]

        def timed_sample(original: Callable[..., Any]) -> Callable[..., Any]:
            def inner(*a: Any, **k: Any) -> Any:
                t = time.thread_time()
                try:
                    return original(*a, **k)
                finally:
                    probe.sample_cpu += time.thread_time() - t

            return inner

        def timed_step(original: Callable[..., Any]) -> Callable[..., Any]:
            def inner(self_: Any, seqs: Any, *a: Any, **k: Any) -> Any:
                probe.sample_cpu = 0.0
                chunk = _prefill_tokens(a[0] if a else k.get("prefill"))
                wall, t = time.perf_counter(), time.thread_time()
                out = original(self_, seqs, *a, **k)
                cpu = time.thread_time() - t
                probe.steps.append((wall, time.perf_counter(), cpu, len(seqs), chunk))
                probe.step_cpu.append(cpu)
                probe.samples.append(probe.sample_cpu)
                probe.step_rows.append(len(seqs))
                if probe.on_step is not None:
                    probe.on_step()
                return out

            return inner

        if hasattr(sampling, "BatchSampler"):  # the batched sampler (one call per step)
            self.wrap(sampling.BatchSampler, "sample", timed_sample)
        else:  # the per-row sampler of older commits (one call per row)
            self.wrap(sequence.Sequence, "choose", timed_sample)
        self.wrap(backend_cls, "step", timed_step)


def _prefill_tokens(work: Any) -> int:
    """Prompt tokens a step's prefill work carries (``[(sequence, tokens), ...]``; 0 if another shape)."""
    try:
        return sum(int(n) for _, n in work or ())
    except (TypeError, ValueError):
        return 0


def kv_bytes(engine: LocalEngine) -> tuple[int, int]:
    """(bytes of KV cache allocated now, tokens whose keys/values the cache holds)."""
    scheduler: Any = engine._scheduler
    backend = scheduler._backend
    if hasattr(backend, "kv_bytes"):  # the block cache reports itself
        return int(backend.kv_bytes()), int(backend.tokens_held())
    total = 0
    caches = [getattr(backend, "cache", None)] + [s.cache for s in scheduler._active]
    if scheduler._prefilling is not None:
        caches.append(scheduler._prefilling.cache)
    for cache in caches:
        if cache is None:
            continue
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size() * 2
    held = sum(s.length - 1 for s in scheduler._active if not s.finished)
    return total, held


def bytes_per_token(engine: LocalEngine) -> int:
    import torch

    cfg: Any = engine._loaded.model.config  # type: ignore[union-attr]
    cfg = getattr(cfg, "text_config", cfg)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = engine._loaded.dtype  # type: ignore[union-attr]
    return 2 * cfg.num_hidden_layers * kv * head_dim * torch.empty((), dtype=dtype).element_size()


# -- the four measures ---------------------------------------------------------------------------------


async def throughput(
    engine: LocalEngine, probe: Probe, streams: list[int], max_tokens: int, rounds: int
) -> None:
    base: float | None = None
    base_cpu: float | None = None
    base_step: float | None = None
    for n in streams:
        rates, cpu_rates = [], []
        probe.step_cpu.clear()
        probe.step_rows.clear()
        probe.samples.clear()
        for _ in range(rounds):
            start, cpu = time.perf_counter(), time.process_time()
            counts = await asyncio.gather(
                *(stream(engine, req(PROMPT, max_tokens, 100 + i, f"t{n}-{i}")) for i in range(n))
            )
            rates.append(sum(counts) / (time.perf_counter() - start))
            cpu_rates.append(sum(counts) / (time.process_time() - cpu))
        best, best_cpu = max(rates), max(cpu_rates)
        base = base or best
        base_cpu = base_cpu or best_cpu
        # The inference thread's CPU per decode step with all n rows in it: tokens per thread-CPU
        # second, the figure that holds up best while other jobs share the machine.
        full = [c for c, rows in zip(probe.step_cpu, probe.step_rows, strict=True) if rows == n]
        step = statistics.median(full) if full else float("nan")
        base_step = base_step or n / step
        print(
            f"  direct  {n:2d} stream{'s' if n > 1 else ' '}: {best:7.1f} tokens/s wall "
            f"({best / base:4.2f}x one stream), {best_cpu:7.1f} tokens per CPU-second "
            f"({best_cpu / base_cpu:4.2f}x); inference thread {step * 1000:5.2f} ms CPU per step = "
            f"{n / step:7.1f} tokens per thread-CPU-second ({n / step / base_step:4.2f}x); best of {rounds}",
            flush=True,
        )


async def sampling_share(engine: LocalEngine, probe: Probe, max_tokens: int) -> None:
    probe.step_cpu.clear()
    probe.samples.clear()
    probe.step_rows.clear()
    await asyncio.gather(*(stream(engine, req(PROMPT, max_tokens, 7 + i, f"s{i}")) for i in range(8)))
    at8 = [(s, c) for s, c, n in zip(probe.samples, probe.step_cpu, probe.step_rows, strict=True) if n == 8]
    if not at8:
        print("  sampling share: no step ran at batch 8")
        return
    sample = statistics.median(s for s, _ in at8)
    step = statistics.median(c for _, c in at8)
    print(
        f"  sampling at batch 8: {sample * 1000:6.2f} ms of a {step * 1000:6.2f} ms step "
        f"({100 * sample / step:4.1f}% of the step; CPU time, median of {len(at8)} steps)",
        flush=True,
    )


async def kv_memory(engine: LocalEngine, probe: Probe) -> None:
    per_token = bytes_per_token(engine)
    peak = {"bytes": 0, "held": 0, "ratio": 0.0}

    def sample() -> None:
        allocated, held = kv_bytes(engine)
        if allocated > peak["bytes"]:
            peak["bytes"], peak["held"] = allocated, held
        if held:
            peak["ratio"] = max(peak["ratio"], allocated / (held * per_token))

    probe.on_step = sample
    # Mixed lengths: prompts from a few words to ~1,500 tokens, answers from 8 to 160 tokens.
    words = [3, 40, 400, 60, 1200, 10, 200, 800]
    answers = [160, 16, 64, 120, 8, 140, 40, 100]
    reqs = [
        req("lorem ipsum " * w, a, 50 + i, f"kv{i}")
        for i, (w, a) in enumerate(zip(words, answers, strict=False))
    ]
    try:
        await asyncio.gather(*(stream(engine, r) for r in reqs))
    finally:
        probe.on_step = None
    need = peak["held"] * per_token
    print(
        f"  KV at 8 mixed streams: peak {peak['bytes'] / 2**20:7.2f} MiB allocated for "
        f"{peak['held']} held tokens ({need / 2**20:7.2f} MiB needed): {peak['bytes'] / max(need, 1):4.2f}x; "
        f"worst ratio over all steps {peak['ratio']:4.2f}x",
        flush=True,
    )


async def long_prompt_gap(engine: LocalEngine, probe: Probe, prompt_tokens: int, chunk: int) -> None:
    """The running stream's longest gap between two deltas while a long prompt is prefilled, against
    the step that carried a prefill chunk inside that gap (the chunk's own step, not a median over
    decode steps too), and what else happened inside the gap: how many steps ran, how many chunks,
    and the wall time no step was running (the event loop, the tokenizer, the GIL)."""
    stamps: list[float] = []
    runner = asyncio.ensure_future(stream(engine, req(PROMPT, 100_000, 3, "gap-runner"), stamps))
    while len(stamps) < 20:
        await asyncio.sleep(0.01)
    probe.step_cpu.clear()
    probe.step_rows.clear()
    probe.samples.clear()
    probe.steps.clear()
    arrived = time.perf_counter()
    tok: Any = engine._loaded.tokenizer  # type: ignore[union-attr]
    per_word = len(tok("lorem " * 100, add_special_tokens=False)["input_ids"]) / 100
    # 0.95 leaves room for the chat template's own tokens.
    text = "lorem " * int(prompt_tokens * 0.95 / per_word)
    long_started = time.perf_counter()
    long_task = asyncio.ensure_future(stream(engine, req(text, 2, 4, "gap-long")))
    await long_task
    refused_or_done = time.perf_counter() - long_started
    done = time.perf_counter()
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    pairs = [(a, b) for a, b in itertools.pairwise(stamps) if b >= arrived and a <= done]
    steady = [b - a for a, b in itertools.pairwise(stamps)]
    chunked = [s for s in probe.steps if s[4] > 0]
    if not pairs or not chunked:
        print(f"  {prompt_tokens}-token prompt mid-stream: no gap or no chunk step seen", flush=True)
        return
    a, b = max(pairs, key=lambda p: p[1] - p[0])
    longest = b - a
    # The steps of the gap: those whose middle lies inside it (a step hands its token over just before
    # it ends, and the next one starts before the event loop has stamped that token, so starts and ends
    # sit a hair either side of the stamps); the time steps ran, from every step overlapping it.
    inside = [s for s in probe.steps if a < (s[0] + s[1]) / 2 < b]
    chunks_inside = [s for s in inside if s[4] > 0]
    busy = sum(max(0.0, min(s[1], b) - max(s[0], a)) for s in probe.steps)
    # The denominator: the chunk step inside the gap (the costliest, if several), else the costliest one.
    own = max(chunks_inside or chunked, key=lambda s: s[1] - s[0])
    own_wall, own_cpu = own[1] - own[0], own[2]
    median_all = statistics.median(s[2] for s in probe.steps)
    chunk_cpu = [s[2] for s in chunked]
    print(
        f"  {prompt_tokens}-token prompt mid-stream: answered in {refused_or_done:5.2f} s; steady gap "
        f"{statistics.median(steady) * 1000:5.1f} ms; {len(chunked)} chunk steps of <= {chunk} tokens, "
        f"CPU first {chunk_cpu[0] * 1000:.1f} / median {statistics.median(chunk_cpu) * 1000:.1f} / last "
        f"{chunk_cpu[-1] * 1000:.1f} ms",
        flush=True,
    )
    print(
        f"    longest gap {longest * 1000:7.1f} ms: {len(inside)} steps inside ({len(chunks_inside)} with "
        f"a chunk), steps running {busy * 1000:.1f} ms of it, no step {(longest - busy) * 1000:.1f} ms",
        flush=True,
    )
    print(
        f"    against the chunk's own step ({own[4]} tokens, {own_wall * 1000:.1f} ms wall, "
        f"{own_cpu * 1000:.1f} ms CPU): {longest / max(own_wall, 1e-9):4.2f}x its wall time, "
        f"{longest / max(own_cpu, 1e-9):4.2f}x its CPU time (target <= 2x); the old figure, against "
        f"the median of all steps' CPU ({median_all * 1000:.1f} ms): {longest / max(median_all, 1e-9):4.2f}x",
        flush=True,
    )


async def bench(path: str, args: argparse.Namespace) -> None:
    config = ModelConfig(id="bench", path=path, max_batch_size=max(16, *args.streams))
    engine = LocalEngine(config, settings=Settings(home=Path(tempfile.mkdtemp())))
    await engine.start()
    probe = Probe()
    try:
        await stream(engine, req(PROMPT, 8, 1, "warm"))
        probe.install(engine)
        if "throughput" in args.parts:
            await throughput(engine, probe, args.streams, args.max_tokens, args.rounds)
        if "sampling" in args.parts:
            await sampling_share(engine, probe, args.max_tokens)
        if "kv" in args.parts:
            await kv_memory(engine, probe)
        context = engine.capabilities.max_context
        if "gap" in args.parts:
            # The chunk is a local-engine option now (LocalModelConfig); older layouts had it flat.
            chunk = getattr(getattr(engine, "_config", config), "prefill_chunk", 512)
            await long_prompt_gap(engine, probe, min(32_000, context - 200), chunk)
    finally:
        probe.undo()
        await engine.aclose()


def through_server(path: str, args: argparse.Namespace) -> None:
    from openai import AsyncOpenAI

    from tests.support import start_server

    home = Path(tempfile.mkdtemp(prefix="qwgw-bench-"))
    # The local engine, as in the direct runs (a .gguf without an engine would go to llama.cpp), with
    # the same batch size (the server's default of 8 would queue half of 16 streams) and the same torch
    # thread count (the server is another process: --threads reaches it as OMP_NUM_THREADS, which
    # torch reads at start).
    config = home / "bench.toml"
    size = max(16, *args.streams)
    config.write_text(
        f'[[models]]\nid = "bench"\nengine = "local"\npath = {json.dumps(path)}\n'
        f"max_batch_size = {size}\nmax_queue = {size}\n"
    )
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    server = start_server(home, "--config", str(config), timeout=600)

    async def one(client: AsyncOpenAI, seed: int) -> int:
        chunks = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            max_tokens=args.max_tokens,
            seed=seed,
            stream_options={"include_usage": True},
        )
        tokens = 0
        async for chunk in chunks:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens

    async def measure(n: int) -> float:
        client = AsyncOpenAI(api_key=server.api_key, base_url=server.compat_url, timeout=600)
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, 100 + i) for i in range(n)))
        rate = sum(counts) / (time.perf_counter() - start)
        await client.close()
        return rate

    try:
        asyncio.run(measure(1))
        base: float | None = None
        for n in args.streams:
            best = max(asyncio.run(measure(n)) for _ in range(args.rounds))
            base = base or best
            print(
                f"  server  {n:2d} stream{'s' if n > 1 else ' '}: {best:7.1f} tokens/s ({best / base:4.2f}x)"
            )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", nargs="*", help="default: tiny-qwen2.5 and the embedded SmolLM2")
    parser.add_argument("--home", type=Path, default=Path("~/.qwen-gateway").expanduser())
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["throughput", "sampling", "kv", "gap"])
    parser.add_argument("--server", action="store_true", help="also measure tokens/s through the server")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch intra-op threads: {torch.get_num_threads()}", flush=True)
    paths = args.model_path or [str(TINY.resolve()), str(ensure_embedded_model(args.home))]
    for path in paths:
        print(f"model: {path} (max_tokens={args.max_tokens}, default sampling, seeded)", flush=True)
        asyncio.run(bench(path, args))
        if args.server:
            through_server(path, args)


if __name__ == "__main__":
    main()
