"""The usage ledger through the real server: one row per request, under its own request id, and none
lost when the server is stopped with SIGINT while requests are running.

Every test looks up only its own requests' rows, by the ``X-Request-ID`` each answer carried.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import MODELS, Server, start_server

PROMPT = [{"role": "user", "content": "Count to ten."}]


async def _non_stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    r = await client.post(
        "/chat/completions", json={"model": model, "messages": PROMPT, "max_tokens": max_tokens}
    )
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"], r.json()["usage"]


async def _stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
        return r.headers["x-request-id"], usage


def _client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.compat_url,
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=httpx.Timeout(300),
    )


def test_a_burst_gets_one_row_per_request_with_its_own_id_and_usage(server: Server) -> None:
    async def burst() -> list[tuple[str, dict[str, Any]]]:
        async with _client(server) as client:
            calls = [_non_stream(client, "qwen-plus", 4) for _ in range(12)]
            calls += [_stream(client, "qwen-plus", 4) for _ in range(12)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    request_ids = [rid for rid, _ in answers]
    assert len(set(request_ids)) == len(request_ids) == 24
    key_ids = set()
    for request_id, usage in answers:
        # The answer went out after its row was committed: it is there as soon as the answer is.
        (row,) = server.ledger(request_id)
        assert row["status"] == "ok"
        assert row["model"] == "qwen-plus"
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage["total_tokens"],
        )
        key_ids.add(row["key_id"])
    # All under the one key the requests were made with.
    assert len(key_ids) == 1 and None not in key_ids


# A short grace period: the streams (4000 tokens each) are cut by the shutdown, not awaited for 30 s.
CONFIG = """
[server]
shutdown_grace_seconds = 1.0

[[models]]
id = "qwen-turbo"
engine = "local"
path = "{path}"
max_output = 4096
"""


@pytest.mark.slow
def test_sigint_with_requests_running_leaves_every_row_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    config = home / "config.toml"
    config.write_text(CONFIG.format(path=MODELS / "tiny-qwen2.5"))
    server = start_server(home, "--config", str(config))
    streams_started = 0
    all_started = asyncio.Event()
    n_streams = 6

    async def long_stream(client: httpx.AsyncClient, seed: int) -> tuple[str, int]:
        nonlocal streams_started
        body = {"model": "qwen-turbo", "messages": PROMPT, "max_tokens": 4000, "stream": True}
        body.update(temperature=1.0, seed=seed)
        chunks = 0
        request_id = ""
        try:
            async with client.stream("POST", "/chat/completions", json=body) as r:
                assert r.status_code == 200
                request_id = r.headers["x-request-id"]
                async for line in r.aiter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        chunks += 1
                        if chunks == 1:
                            streams_started += 1
                            if streams_started == n_streams:
                                all_started.set()
        except httpx.HTTPError:
            pass  # the server may cut the stream short when it stops: that is the point
        return request_id, chunks

    async def scenario() -> tuple[list[tuple[str, int]], list[str]]:
        async with _client(server) as client:
            finished = [await _non_stream(client, "qwen-turbo", 8) for _ in range(3)]
            streams = [asyncio.create_task(long_stream(client, seed)) for seed in range(n_streams)]
            # Every stream is generating (and has its request id) before the signal goes out.
            await asyncio.wait_for(all_started.wait(), timeout=300)
            server.proc.send_signal(signal.SIGINT)
            results = await asyncio.gather(*streams)
        return results, [rid for rid, _ in finished]

    try:
        streamed, answered = asyncio.run(scenario())
        assert server.proc.wait(timeout=120) == 0, server.log()
    finally:
        server.stop()
    assert "could not be written" not in server.log()
    for request_id in answered:
        (row,) = server.ledger(request_id)
        assert row["status"] == "ok"
    for request_id, chunks in streamed:
        assert request_id
        (row,) = server.ledger(request_id)
        assert row["status"] in {"ok", "cancelled", "error"}
        # Billed for at least what was delivered (a chunk carries one token or more).
        assert row["completion_tokens"] >= chunks >= 1
