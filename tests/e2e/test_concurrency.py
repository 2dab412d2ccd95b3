"""Several streams at once, and a client that goes away mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time

import httpx
from openai import AsyncOpenAI

from tests.support import Server

MSG = [{"role": "user", "content": "Write a long poem about mountains."}]


def active(server: Server, model: str = "qwen-turbo") -> int:
    body = httpx.get(f"{server.base_url}/health", timeout=5).json()
    return next(m["active_generations"] for m in body["models"] if m["id"] == model)


def test_two_concurrent_streams_both_progress(server: Server) -> None:
    events: list[tuple[str, str, float]] = []

    async def run(name: str, seed: int) -> None:
        client = AsyncOpenAI(api_key=server.api_key, base_url=server.compat_url)
        stream = await client.chat.completions.create(
            model="qwen-turbo",
            messages=MSG,
            stream=True,
            max_tokens=300,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                events.append((name, "token", time.monotonic()))
        events.append((name, "end", time.monotonic()))
        await client.close()

    async def main() -> None:
        await asyncio.gather(run("a", 1), run("b", 2))

    asyncio.run(main())
    end = {name: t for name, kind, t in events if kind == "end"}
    tokens = {name: [t for n, kind, t in events if n == name and kind == "token"] for name in "ab"}
    assert len(tokens["a"]) > 50 and len(tokens["b"]) > 50
    # Each stream had received tokens while the other was still running: neither waited its turn.
    assert tokens["a"][0] < end["b"] and tokens["b"][0] < end["a"]
    # ... and most of the shorter stream's tokens came before the other stream finished.
    overlap_a = sum(t < end["b"] for t in tokens["a"]) / len(tokens["a"])
    overlap_b = sum(t < end["a"] for t in tokens["b"]) / len(tokens["b"])
    assert max(overlap_a, overlap_b) > 0.9 and min(overlap_a, overlap_b) > 0.3
    assert active(server) == 0


def test_killed_streaming_client_frees_engine(server: Server) -> None:
    body = (
        '{"model": "qwen-turbo", "stream": true, "max_tokens": 4000, "temperature": 1.0, "seed": 9,'
        ' "messages": [{"role": "user", "content": "Count forever."}]}'
    )
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "-N",
            f"{server.compat_url}/chat/completions",
            "-H",
            f"Authorization: Bearer {server.api_key}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # Wait until tokens flow, then kill the client outright.
    received = b""
    while received.count(b"data: ") < 20:
        line = proc.stdout.readline()
        assert line, "stream ended early"
        received += line
    assert active(server) == 1
    proc.kill()
    proc.wait()
    killed_at = time.monotonic()
    while active(server) != 0:
        assert time.monotonic() - killed_at < 2.0, "engine still busy 2 s after the client died"
        time.sleep(0.05)
    freed_in = time.monotonic() - killed_at
    print(f"engine freed {freed_in:.3f}s after the client was killed")
    # The tokens generated before the server saw the abort are on the ledger, marked cancelled.
    deadline = time.monotonic() + 5
    while (row := server.ledger()[0])["status"] != "cancelled":
        assert time.monotonic() < deadline, dict(row)
        time.sleep(0.05)
    assert row["model"] == "qwen-turbo" and row["completion_tokens"] >= 19
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] and row["prompt_tokens"] > 0


def test_disconnect_on_non_stream_frees_engine(server: Server) -> None:
    with httpx.Client(timeout=0.7) as client, contextlib.suppress(httpx.ReadTimeout):
        client.post(
            f"{server.compat_url}/chat/completions",
            headers={"Authorization": f"Bearer {server.api_key}"},
            json={
                "model": "qwen-turbo",
                "max_tokens": 4000,
                "temperature": 1.0,
                "seed": 9,
                "messages": [{"role": "user", "content": "Count forever."}],
            },
        )
    gone_at = time.monotonic()
    while active(server) != 0:
        assert time.monotonic() - gone_at < 2.0
        time.sleep(0.05)


def test_many_clients_some_abandoning_leave_nothing_behind(server: Server) -> None:
    """A bounded burst: 16 streaming and non-streaming clients on one model (more than the batch of
    8), a third of them hanging up early. Every answer is well-formed, the engine ends idle, and every
    request has exactly one ledger row."""
    before = len(server.ledger())

    async def client_run(i: int) -> str:
        async with httpx.AsyncClient(
            base_url=server.compat_url, timeout=60, headers={"Authorization": f"Bearer {server.api_key}"}
        ) as http:
            body = {
                "model": "qwen-turbo",
                "messages": [{"role": "user", "content": f"story {i}"}],
                "max_tokens": 20 + 7 * i,
                "temperature": 1.0,
                "seed": i,
            }
            if i % 2:
                r = await http.post("/chat/completions", json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                return "ok"
            async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                last = ""
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen, last = seen + 1, line
                        if i % 3 == 0 and seen == 5:
                            return "abandoned"  # leaving the block closes the connection mid-stream
                assert last == "data: [DONE]"
                return "ok"

    async def main() -> list[str]:
        return list(await asyncio.gather(*(client_run(i) for i in range(16))))

    outcomes = asyncio.run(main())
    assert outcomes.count("abandoned") == 3
    deadline = time.monotonic() + 5
    while active(server) != 0 or len(server.ledger()) - before < 16:
        assert time.monotonic() < deadline, (active(server), len(server.ledger()) - before)
        time.sleep(0.05)
    rows = server.ledger()[: len(server.ledger()) - before]
    assert len(rows) == 16
    assert sorted(r["status"] for r in rows).count("cancelled") == 3
