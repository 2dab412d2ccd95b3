"""Several streams at once, and a client that goes away mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import Server, wait_for

MSG = [{"role": "user", "content": "Write a long poem about mountains."}]


def active(server: Server, model: str = "qwen-turbo") -> int:
    body = httpx.get(f"{server.base_url}/health", timeout=5).json()
    return next(m["active_generations"] for m in body["models"] if m["id"] == model)


def test_two_concurrent_streams_both_progress(server: Server) -> None:
    """Both streams get tokens while the other is still running: neither waits for the other to end.
    Shown by order of events alone (no timing): b starts and streams while a is open and unfinished,
    then a streams on, and the engine reports both as active at once."""
    body = {"model": "qwen-turbo", "messages": MSG, "stream": True, "max_tokens": 4000, "temperature": 1.0}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.compat_url}/chat/completions"

    def contents(lines: Iterator[str], count: int) -> int:
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                seen += 1
                if seen == count:
                    return seen
        return seen

    with (
        httpx.Client(timeout=60, headers=headers) as client,
        client.stream("POST", url, json={**body, "seed": 1}) as a,
    ):
        a_lines = a.iter_lines()
        assert contents(a_lines, 5) == 5
        with client.stream("POST", url, json={**body, "seed": 2}) as b:
            b_lines = b.iter_lines()
            assert contents(b_lines, 5) == 5  # b streams while a is unfinished
            assert active(server) == 2
            assert contents(a_lines, 5) == 5  # and a goes on while b is unfinished
            assert contents(b_lines, 5) == 5
    wait_for(lambda: active(server) == 0, "the engine to be idle")


def test_killed_streaming_client_frees_engine(server: Server, tmp_path: Path) -> None:
    body = (
        '{"model": "qwen-turbo", "stream": true, "max_tokens": 4000, "temperature": 1.0, "seed": 9,'
        ' "messages": [{"role": "user", "content": "Count forever."}]}'
    )
    header_file = tmp_path / "headers.txt"
    proc = subprocess.Popen(
        [
            "curl",
            "-sS",
            "-N",
            "-D",
            str(header_file),
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
    request_id = next(
        line.split(":", 1)[1].strip()
        for line in header_file.read_text().splitlines()
        if line.lower().startswith("x-request-id:")
    )
    assert active(server) == 1
    proc.kill()
    proc.wait()
    wait_for(lambda: active(server) == 0, "the engine to notice the client died")
    # The tokens generated before the server saw the abort are on the ledger, marked cancelled.
    wait_for(lambda: len(server.ledger(request_id)) == 1, "the ledger row")
    (row,) = server.ledger(request_id)
    assert row["status"] == "cancelled"
    assert row["model"] == "qwen-turbo" and row["completion_tokens"] >= 19
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] and row["prompt_tokens"] > 0


def test_disconnect_on_non_stream_frees_engine(server: Server) -> None:
    # The client gives up (a read timeout) while the answer is still being generated.
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
    wait_for(lambda: active(server) == 0, "the engine to notice the client left")


@pytest.mark.slow  # 16 clients, up to 125 tokens each: the longest of this module
def test_many_clients_some_abandoning_leave_nothing_behind(server: Server) -> None:
    """A bounded burst: 16 streaming and non-streaming clients on one model (more than the batch of
    8), a third of them hanging up early. Every answer is well-formed, the engine ends idle, and every
    request has exactly one ledger row."""
    request_ids: list[str] = []

    async def client_run(i: int) -> str:
        async with httpx.AsyncClient(
            base_url=server.compat_url, timeout=300, headers={"Authorization": f"Bearer {server.api_key}"}
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
                request_ids.append(r.headers["x-request-id"])
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                return "ok"
            async with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
                request_ids.append(r.headers["x-request-id"])
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
    assert len(set(request_ids)) == 16
    wait_for(lambda: all(len(server.ledger(rid)) == 1 for rid in request_ids), "one ledger row each")
    wait_for(lambda: active(server) == 0, "the engine to be idle")
    rows = [server.ledger(rid)[0] for rid in request_ids]
    assert sorted(r["status"] for r in rows).count("cancelled") == 3
