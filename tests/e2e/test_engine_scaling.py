"""The batched engine under load through the real server: a prompt far beyond the context is refused
quickly and without stalling the streams already running."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx

from tests.support import Server


def test_a_32_mb_prompt_is_refused_fast_and_a_running_stream_keeps_flowing(server: Server) -> None:
    """Issue 6 item 3: refused in under 2 s, the concurrent stream's largest gap under 1 s."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.compat_url}/chat/completions"
    huge = "lorem " * (32 * 1024 * 1024 // 6)  # 32 MB of text, ~5.6M tokens: nowhere near 32k
    body = json.dumps(
        {"model": "qwen-turbo", "messages": [{"role": "user", "content": huge}], "max_tokens": 4}
    )

    async def main() -> tuple[float, httpx.Response, list[float], float, float]:
        stamps: list[float] = []
        started = asyncio.Event()
        done = asyncio.Event()

        async def stream() -> None:
            payload = {
                "model": "qwen-turbo",
                "messages": [{"role": "user", "content": "Write a long poem about rivers."}],
                "stream": True,
                "max_tokens": 4000,
                "temperature": 1.0,
                "seed": 5,
            }
            async with (
                httpx.AsyncClient(timeout=120) as client,
                client.stream("POST", url, json=payload, headers=headers) as response,
            ):
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        stamps.append(time.monotonic())
                        if len(stamps) == 20:
                            started.set()
                    if done.is_set():
                        return

        runner = asyncio.ensure_future(stream())
        await asyncio.wait_for(started.wait(), 120)
        async with httpx.AsyncClient(timeout=120) as client:
            sent = time.monotonic()
            refused = await client.post(
                url, content=body, headers={**headers, "Content-Type": "application/json"}
            )
            took = time.monotonic() - sent
        after = len(stamps)
        while len(stamps) < after + 20:  # the stream goes on after the refusal
            await asyncio.sleep(0.01)
        done.set()
        await asyncio.wait_for(runner, 120)
        return took, refused, stamps, sent, sent + took

    took, refused, stamps, sent, answered = asyncio.run(main())
    assert refused.status_code == 400, refused.text
    error = refused.json()
    assert error["error"]["param"] == "messages" and "input length" in error["error"]["message"]
    gaps = [b - a for a, b in itertools.pairwise(stamps) if b >= sent and a <= answered + 0.5]
    # Issue 6 asks for under 2 s and gaps under 1 s (benchmarks measure that); a test on a shared 2-core
    # machine bounds them at 10x, which still fails an engine that tokenizes the 32 MB (minutes) or
    # stalls the stream on it.
    assert took < 20.0, f"refused after {took:.2f} s"
    assert gaps and max(gaps) < 10.0, f"largest gap {max(gaps):.2f} s"
