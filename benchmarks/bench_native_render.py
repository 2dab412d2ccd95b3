"""CPU cost of rendering one stream event: compatible mode vs native (incremental and not).

In-process, no HTTP: a stream of ``--events`` one-token content deltas (each preceded by its usage, as
the service sends them to a native call) goes through ``compat.sse_frames`` and ``native.sse_frames``.
Prints the median over ``--rounds`` of process CPU microseconds per event. ``incremental_output``
false repeats the whole text so far in every event (DashScope's semantics), so its cost grows with the
answer: the figure is for an answer of ``--events`` tokens.

    PYTHONPATH=.:benchmarks python benchmarks/bench_native_render.py [--events 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncGenerator, Callable

from zero_cost_engine import ZeroCostEngine

from qwen_gateway.api.render import compat, native
from qwen_gateway.engines.base import Usage
from qwen_gateway.service.events import ChoiceEvent, ChoiceFinished, ContentDelta, UsageProgress, UsageReport
from qwen_gateway.service.models import ModelRegistry, ServedModel
from qwen_gateway.service.requests.native import NativeCall, build_native_call
from qwen_gateway.settings import ModelConfig


def events(count: int) -> list[ChoiceEvent]:
    out: list[ChoiceEvent] = []
    for i in range(count):
        out += [UsageProgress(Usage(20, i + 1)), ContentDelta(0, f" tok{i}")]
    return [*out, ChoiceFinished(0, "stop"), UsageReport(Usage(20, count))]


async def drain(
    frames: Callable[[AsyncGenerator[ChoiceEvent, None]], AsyncGenerator[bytes, None]],
    items: list[ChoiceEvent],
) -> int:
    async def source() -> AsyncGenerator[ChoiceEvent, None]:
        for item in items:
            yield item

    size = 0
    async for frame in frames(source()):
        size += len(frame)
    return size


def cpu_per_event(
    frames: Callable[..., AsyncGenerator[bytes, None]], items: list[ChoiceEvent], rounds: int
) -> float:
    samples = []
    for _ in range(rounds):
        start = time.process_time()
        asyncio.run(drain(frames, items))
        samples.append((time.process_time() - start) / (len(items) // 2) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = ModelConfig(id="qwen-plus", engine="zero_cost_engine:ZeroCostEngine")
    models = ModelRegistry([ServedModel.build(config, ZeroCostEngine(config))])  # type: ignore[arg-type]
    body = {"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "hi"}]}}
    base: NativeCall = build_native_call(body, models, request_id="bench", multimodal=False, stream=True)
    items = events(args.events)
    cases = {
        "compat": lambda ev: compat.sse_frames(base.chat, ev),
        "native incremental": lambda ev: native.sse_frames(dataclasses.replace(base, incremental=True), ev),
        "native full text": lambda ev: native.sse_frames(dataclasses.replace(base, incremental=False), ev),
    }
    print(f"{args.events}-token answer, median of {args.rounds} rounds, process CPU per event")
    for name, frames in cases.items():
        print(f"{name:>20}: {cpu_per_event(frames, items, args.rounds):7.1f} us/event")


if __name__ == "__main__":
    main()
